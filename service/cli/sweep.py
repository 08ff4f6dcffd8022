"""`cnnserve sweep`: start a sweep on a running API and show its leaderboard live.

The leaderboard comes from the API's event stream (`GET /v1/sweeps/{id}/events`); on a
terminal the table is redrawn in place, otherwise a new one is printed whenever it changes. It
uses only the standard library, so it runs wherever Python does.

    cnnserve sweep --base '{"model": "lenet", "epochs": 2}' --grid lr=0.1,0.5 \
        --grid batch_size=64,128
    cnnserve sweep --base '{"model": "lenet"}' --random 8 --space lr=0.01:1:log \
        --space optimizer=sgd,adamw
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

DEFAULT_API = "http://127.0.0.1:8000"


class CliError(Exception):
    """What went wrong, said so that the user can fix it."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: optimizer=sgd


def _values(text: str) -> list[Any]:
    # arch pairs and objects hold commas: separate them with ;
    sep = ";" if "[" in text or "{" in text else ","
    return [_value(v.strip()) for v in text.split(sep) if v.strip()]


def _range(text: str) -> dict[str, Any] | None:
    """MIN:MAX or MIN:MAX:log as a range to sample, or None when the text is not one."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[2:] not in ([], ["log"]):
        return None
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return {"min": low, "max": high, "log": parts[2:] == ["log"]}


def _field(arg: str) -> tuple[str, str]:
    field, sep, rest = arg.partition("=")
    if not sep or not field or not rest:
        raise CliError(f"{arg!r}: write FIELD=VALUES, e.g. lr=0.1,0.5")
    return field.strip(), rest.strip()


def build_request(
    base: str,
    grid: list[str] | None,
    random_n: int | None,
    space: list[str] | None,
    name: str | None,
) -> dict[str, Any]:
    """The POST /v1/sweeps body from the command line's arguments."""
    try:
        spec = json.loads(base)
    except ValueError as exc:
        raise CliError(f'--base is not JSON ({exc}); e.g. \'{{"model": "lenet"}}\'') from None
    if not isinstance(spec, dict):
        raise CliError("--base must be a JSON object: a job spec")
    body: dict[str, Any] = {"base": spec}
    if name:
        body["name"] = name
    if grid and random_n is None:
        body["grid"] = {f: _values(v) for f, v in map(_field, grid)}
    elif random_n is not None and space and not grid:
        searched: dict[str, Any] = {}
        for f, v in map(_field, space):
            searched[f] = _range(v) or _values(v)
        body["random"] = {"n": random_n, "space": searched}
    else:
        raise CliError("give --grid FIELD=V1,V2 (repeatable), or --random N with --space")
    return body


class Api:
    """The few calls the command makes, with the key when one is set."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise CliError(f"{method} {path}: {exc.code} {_detail(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise CliError(
                f"cannot reach the API at {self.url} ({exc.reason}); is it up?"
            ) from None

    def events(self, path: str) -> Iterator[tuple[str, Any]]:
        """(event, data) of a Server-Sent Event stream, until it ends."""
        request = urllib.request.Request(
            self.url + path, headers={**self.headers, "Accept": "text/event-stream"}
        )
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as exc:
            raise CliError(f"GET {path}: {exc.code} {_detail(exc.read())}") from None
        with response:
            kind, data = "message", list[str]()
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        yield kind, json.loads("\n".join(data))
                    kind, data = "message", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


def _detail(body: bytes) -> str:
    try:
        problem = json.loads(body)
        return str(problem.get("detail") or problem.get("error") or problem)
    except ValueError:
        return body.decode(errors="replace")[:300]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(sweep: dict[str, Any]) -> str:
    """The leaderboard as a fixed-width text table, best first."""
    fields = sweep["varies"]
    head = ["#", "job", "status", *fields, "best val_acc", "epochs", "val_loss", "s/epoch"]
    rows = []
    for i, job in enumerate(sweep["jobs"], start=1):
        epochs = f"{job['epochs_done']}/{job['spec']['epochs']}"
        rows.append(
            [
                str(i),
                job["id"],
                job["status"],
                *(_fmt(job["point"].get(f)) for f in fields),
                _fmt(job["best_val_acc"]),
                epochs,
                _fmt(job["val_loss"]),
                _fmt(job["seconds_per_epoch"], 2),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    counts = ", ".join(f"{n} {s}" for s, n in sweep["counts"].items() if n)
    return f"sweep {sweep['id']}: {sweep['status']} ({counts})\n" + "\n".join(lines)


def follow(api: Api, sweep_id: str, sort: str, out: TextIO) -> dict[str, Any]:
    """Show the sweep's leaderboard until it finishes; returns its last state."""
    live = out.isatty()
    last_text = ""
    last: dict[str, Any] = {}
    for kind, data in api.events(f"/v1/sweeps/{sweep_id}/events?sort={sort}"):
        if kind != "sweep":
            continue
        last, text = data, table(data)
        if text == last_text:
            continue
        if live and last_text:
            out.write(f"\x1b[{last_text.count(chr(10)) + 1}F\x1b[J")  # back up, clear, redraw
        elif last_text:
            out.write("\n")  # not a terminal: each new table after a blank line
        out.write(text + "\n")
        out.flush()
        last_text = text
    return last


def run_sweep(args: Any, out: TextIO = sys.stdout) -> int:
    """The `cnnserve sweep` command; 0 when every job of the sweep succeeded."""
    api = Api(
        args.api or os.environ.get("CNNSERVE_API_URL", DEFAULT_API),
        args.key or os.environ.get("CNNSERVE_API_KEY"),
    )
    try:
        if args.follow:
            sweep_id = args.follow
        else:
            body = build_request(args.base or "", args.grid, args.random, args.space, args.name)
            sweep_id = api.call("POST", "/v1/sweeps", body)["id"]
            out.write(f"sweep {sweep_id} started; Ctrl-C stops watching (the sweep runs on)\n")
        final = follow(api, sweep_id, args.sort, out)
    except CliError as exc:
        sys.stderr.write(f"cnnserve sweep: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\nstopped watching; cancel with POST /v1/sweeps/<id>/cancel\n")
        return 130
    return 0 if final.get("status") == "succeeded" else 1
