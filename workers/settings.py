"""Settings shared by workers and the API, read from `CNNSERVE_*` environment variables."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

import limits
from pydantic import ByteSize, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: A device a job or worker may name: `auto`, `cpu`, `cuda` or `cuda:N`.
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]{1,2})$"
#: Where checkpoints may be kept: `s3://bucket[/prefix]` (any S3-compatible store).
CHECKPOINT_URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$"
#: What a principal's name (the `owner` of jobs, sweeps, checkpoints) may look like: it
#: becomes part of Redis keys.
OWNER_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


def check_rate(rate: str) -> str:
    """A rate limit as `limits` reads it ("20/second", "600 per minute"); ValueError if not."""
    try:
        limits.parse(rate)
    except ValueError:
        raise ValueError(f"{rate!r} is not a rate: write N/second, N/minute or N/hour") from None
    return rate


class Settings(BaseSettings):
    """Every setting of cnnserve; each field reads `CNNSERVE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", env_file=None, extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Broker and job records.")
    data_dir: Path = Field(
        Path("./data"),
        description="Checkpoints (unless CNNSERVE_CHECKPOINT_URL names a bucket) and this "
        "process's cache of checkpoint files.",
    )
    checkpoint_url: str | None = Field(
        None,
        pattern=CHECKPOINT_URL_PATTERN,
        description="Keep checkpoints in an S3-compatible bucket (`s3://bucket/prefix`) instead "
        "of `data_dir/checkpoints`; credentials, endpoint and region come from the standard "
        "AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, "
        "AWS_DEFAULT_REGION) or the instance's role.",
    )
    cache_bytes: ByteSize = Field(
        ByteSize(4 * 1024**3),
        ge=0,
        description="Bytes of checkpoint weights and ONNX graphs this process keeps on local "
        "disk (`data_dir/cache`, least recently used out first) when checkpoints are in a "
        "bucket: a number of bytes or a size such as 2GiB.",
    )
    fashion_mnist_dir: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"),
        description="Directory with the four Fashion-MNIST IDX .gz files.",
    )
    allow_download: bool = Field(
        False, description="Let torchvision download Fashion-MNIST when the files are missing."
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys, each an admin's (principal `admin`); with "
        "neither these nor a keys file the API is open.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="The keys file (TOML, or JSON by its name): principals, their scopes, "
        "limits and key hashes; `cnnserve keys add` writes it.",
    )
    api_keys_reload_s: float = Field(
        2.0, ge=0, description="How often the API looks for a changed keys file (SIGHUP: now)."
    )
    public_read: bool = Field(
        False, description="With keys: let anyone read (jobs, checkpoints, ...) without one."
    )
    public_predict: bool = Field(
        False, description="With keys: let anyone classify (predict, explain, V2) without one."
    )
    metrics_scope: Literal["", "read", "admin"] = Field(
        "", description="The scope /metrics needs with keys; empty leaves it open (scrapers)."
    )
    max_active_jobs: int | None = Field(
        None, ge=0, description="Queued + running jobs per principal; unset: no limit."
    )
    max_sweep_jobs: int = Field(64, ge=1, le=64, description="Jobs in one sweep, per principal.")
    predict_rate: str | None = Field(
        None,
        description="Predict, explain and V2 infer calls per principal, e.g. 20/second; "
        "unset: no limit. Kept in Redis, shared by every API process.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line, for log collectors."
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
    max_request_pixels: int = Field(
        64 * 1024 * 1024,
        ge=64,
        description="Pixels the images of one predict, explain or V2 infer call may declare in "
        "all (read from their headers before any is decoded): 256 MB were they all held at "
        "once as RGBA; a 413 past it.",
    )
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
    max_streams: int = Field(
        256, ge=1, description="Event streams (SSE) open at once in one API process; a 503 past it."
    )
    max_streams_per_principal: int = Field(
        32,
        ge=1,
        description="Event streams one principal (or one address without a key) may hold open "
        "in one API process; a 429 past it.",
    )
    inference_backend: Literal["auto", "onnxruntime", "eager"] = Field(
        "auto",
        description="auto: ONNX Runtime where the export works (faster on CPUs), else eager.",
    )

    @property
    def api_key_list(self) -> list[str]:
        """The configured API keys, blanks dropped."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @field_validator("predict_rate", "api_keys_file", "checkpoint_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("predict_rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        return check_rate(v) if v is not None else None

    @field_validator("max_active_jobs", mode="before")
    @classmethod
    def _blank_int(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

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
        """The local checkpoint store (used when no `checkpoint_url` is set)."""
        return self.data_dir / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        """This process's cache of files read from (or written to) a remote checkpoint store."""
        return self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests clear the cache to override."""
    return Settings()
