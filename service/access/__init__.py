"""Access control: principals and their keys, scopes, tenants, rate limits and the audit log."""
