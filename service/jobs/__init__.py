"""The API's side of training: submitting and cancelling jobs, and sweeps of many jobs."""
