"""The cnnserve REST API (FastAPI)."""
