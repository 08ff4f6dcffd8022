"""`python -m bench <name> [options]`: run one benchmark (`BENCHMARKS` below), write JSON.

Each benchmark is a module of this package with a `main(argv) -> int`, imported lazily so
`bench http` never loads the training code. To add one, map its name in `BENCHMARKS`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: benchmark name -> module providing `main(argv: Sequence[str] | None) -> int`
BENCHMARKS: dict[str, str] = {
    "infer": "bench.infer",  # batch-1 latency and batched throughput, eager vs served path
    "http": "bench.http",  # concurrent single-image predictions against `cnnserve api`
    "peers": "bench.peers",  # cnnserve beside TorchServe and LitServe, the same weights
    "photos": "bench.photos",  # catalogue-style photos vs raw test PNGs, same checkpoint
    "confusion": "bench.confusion",  # what the confusion matrix costs a validation pass
    "api": "bench.api",  # request cost against the size of the history (10 to 100,000 jobs)
    "checkpoints": "bench.checkpoints",  # a checkpoint save to the local store vs S3
    "streams": "bench.streams",  # idle event streams against what everyone else waits for
    "abuse": "bench.abuse",  # hostile requests: peak memory and event-loop stall, per request
    "train": "bench.train",  # d2l way vs cnnserve's engine (its owner adds bench/train.py)
    "window": "bench.window",  # one GPU window's plan: GPU tests, then short training runs
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHMARKS:
        sys.stderr.write(
            f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [options]\n"
            "  each benchmark takes --help\n"
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    name, rest = args[0], args[1:]
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as exc:
        if exc.name != BENCHMARKS[name]:
            raise
        sys.stderr.write(f"benchmark {name!r} is not available yet ({BENCHMARKS[name]})\n")
        return 2
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
