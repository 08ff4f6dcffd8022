"""Principals and their API keys: the keys file, and the key ring the API authenticates with.

The keys file (`CNNSERVE_API_KEYS_FILE`, TOML, or JSON when its name ends in `.json`) names
principals, each with its scopes, optional per-principal limits and one or more keys. A key is
`cns_<id>_<secret>`; the file keeps its id and the sha256 of the whole key, never the key:

    [principals.alice]
    scopes = ["read", "predict", "train"]
    max_active_jobs = 4            # optional: overrides CNNSERVE_MAX_ACTIVE_JOBS
    predict_rate = "20/second"     # optional: overrides CNNSERVE_PREDICT_RATE

    [[principals.alice.keys]]
    id = "3f2a9c1b7d4e"
    sha256 = "..."
    created_at = "2026-12-02T03:00:00+00:00"

`cnnserve keys add|list|revoke` edit it (under a lock, replaced atomically, mode 0600). The
API re-reads it when it changes (checked at most every `CNNSERVE_API_KEYS_RELOAD_S`) or on
SIGHUP, and keeps the last good version when an edit does not parse. Keys in the legacy
`CNNSERVE_API_KEYS` are the principal `admin`'s.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workers.settings import OWNER_PATTERN, Settings, check_rate

logger = logging.getLogger(__name__)

Scope = Literal["read", "predict", "train", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "predict", "train", "admin")
KEY_RE = re.compile(r"^cns_([0-9a-f]{12})_[A-Za-z0-9_-]{20,128}$")
NAME_RE = re.compile(OWNER_PATTERN)
LEGACY_PRINCIPAL = "admin"
HEADER = (
    "# cnnserve API keys: principals, their scopes and limits, and their keys' sha256 hashes.\n"
    "# Edit with `cnnserve keys add|list|revoke`; the API re-reads this file when it changes.\n"
)


class KeysFileError(ValueError):
    """The keys file cannot be read or does not say what it must."""


class StoredKey(BaseModel):
    """One key of a principal, as the file keeps it: an id and the key's hash."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: str = ""


class PrincipalEntry(BaseModel):
    """A principal in the keys file: scopes, optional limits and keys."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Scope] = Field(min_length=1)
    keys: list[StoredKey] = Field(default_factory=list)
    max_active_jobs: int | None = Field(None, ge=0)
    max_sweep_jobs: int | None = Field(None, ge=1)
    predict_rate: str | None = None

    @field_validator("predict_rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        return check_rate(v) if v is not None else None


class KeysFile(BaseModel):
    """The whole keys file."""

    model_config = ConfigDict(extra="forbid")

    principals: dict[str, PrincipalEntry] = Field(default_factory=dict)

    @field_validator("principals")
    @classmethod
    def _names(cls, v: dict[str, PrincipalEntry]) -> dict[str, PrincipalEntry]:
        for name in v:
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"principal name {name!r}: {NAME_RULE}")
        return v


NAME_RULE = "1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"


def hash_key(key: str) -> str:
    """The sha256 the file keeps of a key (keys are random: a slow hash would add nothing)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its id: `cns_<id>_<secret>` with 256 random bits of secret."""
    key_id = secrets.token_hex(6)
    return f"cns_{key_id}_{secrets.token_urlsafe(32)}", key_id


# --- reading and writing the file ------------------------------------------------------------


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def read_keys_file(path: Path) -> KeysFile:
    """The file's principals (none when it does not exist yet)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return KeysFile()
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(raw) if _is_json(path) else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if _is_json(path) else "TOML"
        raise KeysFileError(f"{path}: not valid {kind}: {exc}") from None
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            + (f" (not {e['input']!r})" if isinstance(e.get("input"), str | int) else "")
            for e in exc.errors(include_url=False)
        )
        raise KeysFileError(f"{path}: {problems}") from None


def _write_keys_file(path: Path, keys: KeysFile) -> None:
    data = keys.model_dump(mode="json", exclude_none=True)
    text = json.dumps(data, indent=2) + "\n" if _is_json(path) else HEADER + tomli_w.dumps(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def editing(path: Path) -> Iterator[KeysFile]:
    """The keys file to change, under an exclusive lock; written back atomically on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        keys = read_keys_file(path)
        yield keys
        _write_keys_file(path, keys)


def add_key(
    path: Path,
    name: str,
    scopes: list[Scope] | None,
    *,
    max_active_jobs: int | None = None,
    max_sweep_jobs: int | None = None,
    predict_rate: str | None = None,
) -> tuple[str, str, PrincipalEntry]:
    """Give `name` a new key (making the principal with `scopes` if it is new; `scopes` and
    the limits, when given, replace its own). Returns the key, its id and the principal."""
    if not NAME_RE.fullmatch(name):
        raise KeysFileError(f"principal name {name!r}: {NAME_RULE}")
    if predict_rate is not None:
        check_rate(predict_rate)
    key, key_id = new_key()
    with editing(path) as keys:
        entry = keys.principals.get(name)
        if entry is None:
            if not scopes:
                raise KeysFileError(
                    f"{name} is a new principal: give its scopes (--scopes read,predict,train)"
                )
            entry = keys.principals[name] = PrincipalEntry(scopes=scopes)
        elif scopes:
            entry.scopes = scopes
        if max_active_jobs is not None:
            entry.max_active_jobs = max_active_jobs
        if max_sweep_jobs is not None:
            entry.max_sweep_jobs = max_sweep_jobs
        if predict_rate is not None:
            entry.predict_rate = predict_rate
        created = datetime.now(UTC).isoformat(timespec="seconds")
        entry.keys.append(StoredKey(id=key_id, sha256=hash_key(key), created_at=created))
    return key, key_id, entry


def revoke(path: Path, what: str) -> str:
    """Remove a principal (every key of it) or one key by its id; says what was removed."""
    with editing(path) as keys:
        if what in keys.principals:
            count = len(keys.principals.pop(what).keys)
            return f"revoked principal {what} ({count} key(s))"
        for name, entry in keys.principals.items():
            kept = [k for k in entry.keys if k.id != what]
            if len(kept) < len(entry.keys):
                entry.keys = kept
                return f"revoked key {what} of {name} ({len(kept)} key(s) left)"
    raise KeysFileError(f"no principal or key id {what!r} in {path}")


# --- the API's view ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Someone the API knows by a key (or nobody, `name` None), and what they may do."""

    name: str | None
    scopes: frozenset[str]
    max_active_jobs: int | None = None
    max_sweep_jobs: int | None = None
    predict_rate: str | None = None
    key_id: str | None = field(default=None, compare=False)

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def may(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    def scope_list(self) -> list[str]:
        return [s for s in SCOPES if s in self.scopes]


def _principal(name: str, entry: PrincipalEntry, settings: Settings, key_id: str) -> Principal:
    return Principal(
        name=name,
        scopes=frozenset(entry.scopes),
        max_active_jobs=(
            entry.max_active_jobs if entry.max_active_jobs is not None else settings.max_active_jobs
        ),
        max_sweep_jobs=(
            entry.max_sweep_jobs if entry.max_sweep_jobs is not None else settings.max_sweep_jobs
        ),
        predict_rate=entry.predict_rate
        if entry.predict_rate is not None
        else settings.predict_rate,
        key_id=key_id,
    )


class KeyRing:
    """The keys the API accepts: the keys file's (re-read when it changes) and the legacy
    `CNNSERVE_API_KEYS` (each the principal `admin`'s)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.api_keys_file
        self._legacy = [k.encode() for k in settings.api_key_list]
        self._by_id: dict[str, tuple[str, str, PrincipalEntry]] = {}
        self._principals = 0
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._reload_requested = False
        self._lock = threading.Lock()
        self.reload(force=True)
        self._next_check = time.monotonic() + settings.api_keys_reload_s

    @property
    def configured(self) -> bool:
        """Whether the API needs keys at all (a keys file is named, or legacy keys are set)."""
        return self.path is not None or bool(self._legacy)

    @property
    def counts(self) -> tuple[int, int]:
        """Principals and keys in the file."""
        return self._principals, len(self._by_id)

    def request_reload(self) -> None:
        """Re-read the file before the next key is checked (SIGHUP)."""
        self._reload_requested = True

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self, force: bool = False) -> bool:
        """Re-read the keys file if it changed (or when `force`); whether it was read."""
        if self.path is None:
            return False
        with self._lock:
            stamp = self._file_stamp()
            if not force and stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                keys = read_keys_file(self.path)
            except KeysFileError as exc:
                logger.error("keys file not reloaded, the previous keys stay in force: %s", exc)
                return False
            self._by_id = {
                k.id: (name, k.sha256, entry)
                for name, entry in keys.principals.items()
                for k in entry.keys
            }
            self._principals = len(keys.principals)
        if stamp is None:
            logger.warning(
                "keys file %s does not exist: no key it would hold is accepted", self.path
            )
        logger.info("keys file %s read: %d principal(s), %d key(s)", self.path, *self.counts)
        return True

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if self._reload_requested:
            self._reload_requested = False
            self.reload(force=True)
        elif now >= self._next_check:
            self._next_check = now + self.settings.api_keys_reload_s
            self.reload()

    def authenticate(self, key: str) -> Principal | None:
        """The principal a key belongs to; None for a key nobody holds."""
        self._maybe_reload()
        m = KEY_RE.fullmatch(key)
        found = self._by_id.get(m[1]) if m is not None else None
        if m is not None and found is not None:
            name, digest, entry = found
            if hmac.compare_digest(hash_key(key), digest):
                return _principal(name, entry, self.settings, m[1])
            return None
        given = key.encode()
        matched = False
        for legacy in self._legacy:
            # no short-circuit: the time taken does not tell which key, or how much, matched
            matched |= hmac.compare_digest(given, legacy)
        if not matched:
            return None
        return Principal(
            name=LEGACY_PRINCIPAL,
            scopes=frozenset({"admin"}),
            max_active_jobs=self.settings.max_active_jobs,
            max_sweep_jobs=self.settings.max_sweep_jobs,
            predict_rate=self.settings.predict_rate,
        )


def listing(path: Path) -> list[dict[str, Any]]:
    """What `cnnserve keys list` shows: principals, scopes, limits and key ids (no hashes)."""
    keys = read_keys_file(path)
    return [
        {
            "principal": name,
            "scopes": entry.scopes,
            "limits": {
                k: v
                for k, v in (
                    ("max_active_jobs", entry.max_active_jobs),
                    ("max_sweep_jobs", entry.max_sweep_jobs),
                    ("predict_rate", entry.predict_rate),
                )
                if v is not None
            },
            "keys": [{"id": k.id, "created_at": k.created_at} for k in entry.keys],
        }
        for name, entry in sorted(keys.principals.items())
    ]
