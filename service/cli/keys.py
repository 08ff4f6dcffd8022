"""`cnnserve keys add|list|revoke`: the keys file's principals and keys, from a terminal.

`add` prints the new key once, alone on the last line of standard output (so
`KEY=$(cnnserve keys add alice --scopes read | tail -n 1)` works); the file keeps only its
hash. The running API picks the change up by itself (or at once on SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import cast

from service.access.keys import SCOPES, KeysFileError, Scope, add_key, listing, revoke

FILE_ENV = "CNNSERVE_API_KEYS_FILE"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help=f"API keys: add, list, revoke ({FILE_ENV})")
    keys.add_argument("--file", help=f"the keys file (default: ${FILE_ENV})")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    add = ksub.add_parser("add", help="a new key for a principal (made if new); printed once")
    add.add_argument("name", help="the principal: a person, team or service")
    add.add_argument(
        "--scopes", help=f"comma-separated, of {', '.join(SCOPES)} (needed for a new principal)"
    )
    add.add_argument("--max-active-jobs", type=int, help="its queued + running jobs at most")
    add.add_argument("--max-sweep-jobs", type=int, help="jobs in one of its sweeps at most")
    add.add_argument("--predict-rate", help="its predict calls, e.g. 20/second")
    lst = ksub.add_parser("list", help="principals, scopes, limits and key ids (no secrets)")
    lst.add_argument("--json", action="store_true", help="as JSON")
    rev = ksub.add_parser("revoke", help="remove a principal (all its keys) or one key by id")
    rev.add_argument("what", help="a principal's name or a key id")


def _scopes(raw: str | None) -> list[Scope] | None:
    if raw is None:
        return None
    scopes = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise KeysFileError(
            f"unknown scope {unknown[0]!r}" if unknown else "--scopes is empty"
        ) from None
    return [cast(Scope, s) for s in dict.fromkeys(scopes)]


def run_keys(args: argparse.Namespace) -> int:
    raw_path = args.file or os.environ.get(FILE_ENV)
    if not raw_path:
        sys.stderr.write(f"cnnserve keys: name the keys file with --file or ${FILE_ENV}\n")
        return 2
    path = Path(raw_path)
    try:
        if args.keys_command == "add":
            key, key_id, entry = add_key(
                path,
                args.name,
                _scopes(args.scopes),
                max_active_jobs=args.max_active_jobs,
                max_sweep_jobs=args.max_sweep_jobs,
                predict_rate=args.predict_rate,
            )
            sys.stdout.write(
                f"added key {key_id} for {args.name} (scopes {', '.join(entry.scopes)}) "
                f"to {path}\nthe key is shown only this once; keep it secret:\n{key}\n"
            )
        elif args.keys_command == "list":
            rows = listing(path)
            if args.json:
                sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            else:
                _print_table(rows)
        else:
            sys.stdout.write(revoke(path, args.what) + "\n")
    except (KeysFileError, ValueError) as exc:
        sys.stderr.write(f"cnnserve keys: {exc}\n")
        return 1
    return 0


def _print_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        sys.stdout.write("no principals yet: cnnserve keys add NAME --scopes read,predict\n")
        return
    sys.stdout.write("principal  scopes  limits  keys\n")
    for row in rows:
        limits = row["limits"]
        assert isinstance(limits, dict)
        keys = row["keys"]
        assert isinstance(keys, list)
        scopes = row["scopes"]
        assert isinstance(scopes, list)
        said = ", ".join(f"{k}={v}" for k, v in limits.items()) or "-"
        ids = ", ".join(str(k["id"]) for k in keys) or "(none)"
        sys.stdout.write(f"{row['principal']}  {','.join(scopes)}  {said}  {ids}\n")
