"""The keys file and `cnnserve keys`: hashes only, scopes, limits, revocation, JSON or TOML."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.access.keys import KeyRing, KeysFileError, add_key, hash_key, read_keys_file, revoke
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def cli(keys_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", *args],
        env={**os.environ, "CNNSERVE_API_KEYS_FILE": str(keys_file)},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_keys_add_prints_the_key_once_and_keeps_only_its_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    r = cli(keys_file, "add", "alice", "--scopes", "read,predict", "--predict-rate", "5/second")
    assert r.returncode == 0, r.stderr
    key = r.stdout.splitlines()[-1]
    assert key.startswith("cns_") and key not in r.stdout.splitlines()[0]
    text = keys_file.read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    listed = cli(keys_file, "list", "--json")
    rows = json.loads(listed.stdout)
    assert rows[0]["principal"] == "alice" and rows[0]["scopes"] == ["read", "predict"]
    assert rows[0]["limits"] == {"predict_rate": "5/second"}
    assert hash_key(key) not in listed.stdout and key not in listed.stdout
    # a second key for alice keeps her scopes; revoking one key leaves the other working
    second = cli(keys_file, "add", "alice").stdout.splitlines()[-1]
    ring = KeyRing(Settings(api_keys_file=keys_file))
    first_id = key.split("_")[1]
    assert {p.name for p in (ring.authenticate(key), ring.authenticate(second)) if p} == {"alice"}
    assert cli(keys_file, "revoke", first_id).returncode == 0
    ring.reload(force=True)
    assert ring.authenticate(key) is None
    principal = ring.authenticate(second)
    assert principal is not None and principal.scopes == {"read", "predict"}
    assert principal.predict_rate == "5/second"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["add", "bob"], "give its scopes"),
        (["add", "bob", "--scopes", "read,fly"], "unknown scope 'fly'"),
        (["add", "Bob Smith", "--scopes", "read"], "principal name"),
        (["add", "bob", "--scopes", "read", "--predict-rate", "fast"], "not a rate"),
        (["revoke", "nobody"], "no principal or key id"),
    ],
)
def test_keys_refuses_what_it_cannot_do_and_says_why(
    tmp_path: Path, args: list[str], says: str
) -> None:
    r = cli(tmp_path / "keys.toml", *args)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert r.stdout == ""  # no key was made


def test_a_json_keys_file_works_the_same(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key, key_id, _ = add_key(keys_file, "svc", ["predict"], max_active_jobs=0)
    data = json.loads(keys_file.read_text())
    assert data["principals"]["svc"]["keys"][0]["id"] == key_id
    ring = KeyRing(Settings(api_keys_file=keys_file))
    principal = ring.authenticate(key)
    assert principal is not None and principal.may("predict") and not principal.may("read")
    assert principal.max_active_jobs == 0
    assert revoke(keys_file, "svc").startswith("revoked principal svc")
    assert read_keys_file(keys_file).principals == {}


def test_a_broken_edit_keeps_the_last_good_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    key, _, _ = add_key(keys_file, "alice", ["read"])
    ring = KeyRing(Settings(api_keys_file=keys_file))
    keys_file.write_text('[principals.alice]\nscopes = ["read", "everything"]\n')
    assert not ring.reload()
    assert ring.authenticate(key) is not None
    with pytest.raises(KeysFileError, match="everything"):
        read_keys_file(keys_file)
