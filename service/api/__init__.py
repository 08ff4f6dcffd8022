"""The HTTP API: app factory, routes, dependencies, error mapping, middleware, the fast path."""
