"""Fixtures for the store tests: API clients (for what the stores serve), from the API suite."""

from tests.service.conftest import make_client  # noqa: F401  (re-exported for this suite)
