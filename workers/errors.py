"""Domain errors of the training side; each message tells a person what to do next."""

from __future__ import annotations


class TrainingError(Exception):
    """A job failure whose message is shown to the user as the job's `error`."""


class DataError(TrainingError):
    """Fashion-MNIST is missing, damaged or not what its checksums say."""


class DeviceError(TrainingError):
    """The job asks for a device this worker does not have."""


class ResumeError(TrainingError):
    """The job's latest checkpoint cannot be resumed from."""


class OutOfMemoryError(TrainingError):
    """The accelerator ran out of memory."""
