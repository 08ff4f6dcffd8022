"""Celery workers: the job contract, the training engine, data and the checkpoint store."""
