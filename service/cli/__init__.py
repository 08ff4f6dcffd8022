"""The `cnnserve` command: `up`, `api`, `worker`, `train`, `sweep`, `keys`.

Each subcommand imports its own side lazily, so `cnnserve api` never loads the training
engine and `cnnserve worker` never loads FastAPI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

DEFAULT_API = "http://127.0.0.1:8000"


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a registered model (GET /v1/models), e.g. lenet")
    p.add_argument(
        "--arch",
        help="a named arch (vgg: small, vgg11), JSON pairs [[1,16],...] (vgg, resnet18) or a "
        'JSON object of the book\'s parameters (densenet: {"growth_rate": 16}, regnetx32)',
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--input-size", type=int, dest="input_size")
    p.add_argument("--seed", type=int)
    p.add_argument("--optimizer", choices=["sgd", "sgd_momentum", "adamw"])
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--train-limit", type=int, dest="train_limit")
    p.add_argument("--val-limit", type=int, dest="val_limit", help="validate on the first N")
    p.add_argument("--init-from", dest="init_from", help="start from this checkpoint (id or alias)")
    p.add_argument(
        "--continue-epochs",
        dest="continue_epochs",
        action="store_true",
        default=None,
        help="with --init-from: number epochs after the parent's",
    )


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
    api.add_argument(
        "--http",
        choices=["auto", "h11", "httptools"],
        # as uvicorn's own command line reads it
        default=os.environ.get("UVICORN_HTTP", "auto"),
        help="uvicorn's HTTP/1.1 parser (UVICORN_HTTP; auto: httptools when installed, else h11)",
    )

    worker = sub.add_parser("worker", help="a Celery training worker (one per GPU)")
    worker.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    worker.add_argument("--name", default=None, help="the worker's node name")
    worker.add_argument(
        "--check",
        action="store_true",
        help="start nothing: exit 0 if a worker on this host beats in Redis (a health check)",
    )

    train = sub.add_parser("train", help="train one job in-process with a progress bar")
    _add_spec_args(train)

    sweep = sub.add_parser(
        "sweep", help="start a sweep on a running API and show its leaderboard live"
    )
    sweep.add_argument("--api", help=f"the API's URL (CNNSERVE_API_URL; {DEFAULT_API})")
    sweep.add_argument("--key", help="an API key (CNNSERVE_API_KEY)")
    sweep.add_argument("--base", help='the base job spec as JSON: \'{"model": "lenet"}\'')
    sweep.add_argument(
        "--grid", action="append", metavar="FIELD=V1,V2", help="values to try (repeatable)"
    )
    sweep.add_argument("--random", type=int, metavar="N", help="N random points instead")
    sweep.add_argument(
        "--space",
        action="append",
        metavar="FIELD=V1,V2|MIN:MAX[:log]",
        help="with --random: choices or a range (repeatable)",
    )
    sweep.add_argument("--name", help="a label for listings")
    sweep.add_argument("--sort", default="best_val_acc", help="the leaderboard's order")
    sweep.add_argument("--follow", metavar="SWEEP_ID", help="watch an existing sweep instead")

    from service.cli.keys import add_parser

    add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command in ("api", "worker", "up") and not getattr(args, "check", False):
        from service.api.logs import configure_logging
        from workers.settings import get_settings

        configure_logging(get_settings())
    if args.command == "up":
        from service.cli.stack import run_stack

        return run_stack(host=args.host, port=args.port, device=args.device)
    if args.command == "api":
        from service.cli.server import serve

        return serve(host=args.host, port=args.port, workers=args.workers, http=args.http)
    if args.command == "worker" and args.check:
        from workers.healthcheck import check_worker
        from workers.settings import get_settings

        healthy, line = check_worker(get_settings().redis_url)
        sys.stdout.write(line + "\n")
        return 0 if healthy else 1
    if args.command == "worker":
        from workers.worker import run_worker

        return run_worker(device=args.device, name=args.name)
    if args.command == "train":
        from workers.training.cli import run_train

        fields = {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "log_level") and v is not None
        }
        return run_train(fields)
    if args.command == "sweep":
        from service.cli.sweep import run_sweep

        return run_sweep(args)
    if args.command == "keys":
        from service.cli.keys import run_keys

        return run_keys(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
