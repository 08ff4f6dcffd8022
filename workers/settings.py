"""Settings shared by workers and the API, read from `CNNSERVE_*` environment variables."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: A device a job or worker may name: `auto`, `cpu`, `cuda` or `cuda:N`.
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]{1,2})$"


class Settings(BaseSettings):
    """Every setting of cnnserve; each field reads `CNNSERVE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", env_file=None, extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker and job records.")
    data_dir: Path = Field(Path("./data"), description="Checkpoints and job files.")
    fashion_mnist_dir: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"),
        description="Directory with the four Fashion-MNIST IDX .gz files.",
    )
    allow_download: bool = Field(
        False, description="Let torchvision download Fashion-MNIST when the files are missing."
    )
    api_keys: str = Field(
        "", description="Comma-separated API keys; none set means the API is open."
    )
    # jobs
    max_queued_jobs: int = Field(100, ge=1, description="Queued jobs beyond this get a 429.")
    job_max_seconds: int = Field(
        6 * 3600, ge=10, description="Wall-time ceiling of one job attempt."
    )
    max_attempts: int = Field(3, ge=1, description="Deliveries of a job before it fails.")
    visibility_timeout: int = Field(
        8 * 3600, ge=10, description="Seconds before Redis redelivers an unacked job."
    )
    lease_seconds: int = Field(30, ge=2, description="A job lease lasts this long unrenewed.")
    keep_checkpoints: int = Field(3, ge=1, description="Epoch checkpoints kept per job, plus best.")
    job_retention: timedelta | None = Field(
        None,
        description="How long a finished job's record and events are kept: seconds or an "
        "ISO 8601 duration (P30D); unset keeps them forever. Checkpoints stay until deleted.",
    )
    # training workers
    worker_device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="The device a worker trains `device=auto` jobs on (`worker --device`).",
    )
    torch_threads: int = Field(
        0, ge=0, le=256, description="CPU threads torch may use for training; 0 = torch's default."
    )
    train_compile: bool = Field(
        False, description="torch.compile the model when training on a CUDA GPU."
    )
    train_cuda_graphs: bool = Field(
        True,
        description="Replay SGD training steps on a CUDA GPU from one captured CUDA graph.",
    )
    # API limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="Largest decoded image.")
    max_images_per_request: int = Field(64, ge=1, description="Images in one predict call.")
    model_cache_size: int = Field(4, ge=1, description="Checkpoints kept loaded for inference.")
    batch_window_ms: float = Field(2.0, ge=0, description="Wait to batch concurrent predictions.")
    max_batch_size: int = Field(64, ge=1, description="Images in one inference batch.")
    batching: bool = Field(
        True, description="Stack concurrent predictions for one checkpoint into one forward pass."
    )
    explain_max_images: int = Field(8, ge=1, description="Images in one explain call.")
    explain_steps: int = Field(
        32, ge=4, le=512, description="Integrated Gradients steps per explained image."
    )
    explain_timeout_s: float = Field(
        30.0, gt=0, description="An explain call that would run longer stops with a 503."
    )
    inference_backend: Literal["auto", "onnxruntime", "eager"] = Field(
        "auto",
        description="auto: ONNX Runtime where the export works (faster on CPUs), else eager.",
    )

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys, blanks dropped."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @field_validator("job_retention", mode="before")
    @classmethod
    def _seconds(cls, v: object) -> object:
        # pydantic reads a bare number only from JSON; an environment variable is a string
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return None
            try:
                return float(v)
            except ValueError:
                return v
        return v

    @field_validator("job_retention")
    @classmethod
    def _positive_retention(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and v.total_seconds() <= 0:
            raise ValueError("job_retention must be positive (leave it unset to keep forever)")
        return v

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests clear the cache to override."""
    return Settings()
