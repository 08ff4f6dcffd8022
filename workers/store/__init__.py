"""The stores both sides share: job records and their indexes, checkpoints, evaluations."""
