"""The `cnnserve` command: `up`, `api`, `worker`, `train`.

Each subcommand imports its own side lazily, so `cnnserve api` never loads the training
engine and `cnnserve worker` never loads FastAPI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="lenet, vgg or resnet18")
    p.add_argument("--arch", help="a named arch (vgg: small, vgg11) or JSON pairs [[1,16],...]")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--input-size", type=int, dest="input_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--optimizer", choices=["sgd", "sgd_momentum", "adamw"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--train-limit", type=int, dest="train_limit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="local stack: Redis if none answers, one worker, the API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--device", default="auto", help="the worker's device")

    api = sub.add_parser("api", help="serve the REST API with uvicorn")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    worker = sub.add_parser("worker", help="a Celery training worker (one per GPU)")
    worker.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    worker.add_argument("--name", default=None, help="the worker's node name")

    train = sub.add_parser("train", help="train one job in-process with a progress bar")
    _add_spec_args(train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "up":
        from service.stack import run_stack

        return run_stack(host=args.host, port=args.port, device=args.device)
    if args.command == "api":
        from service.server import serve

        return serve(host=args.host, port=args.port, workers=args.workers)
    if args.command == "worker":
        from workers.worker import run_worker

        return run_worker(device=args.device, name=args.name)
    if args.command == "train":
        from workers.train_cli import run_train

        fields = {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "log_level") and v is not None
        }
        return run_train(fields)
    return 2


if __name__ == "__main__":
    sys.exit(main())
