"""Training benchmark: each model trained the d2l way and with cnnserve's engine, side by side.

For every model and seed, in one process: `bench.d2l_way.train_d2l_way` (torchvision dataset,
PIL `Resize` + `ToTensor`, a 4-worker DataLoader, per-batch loss read back, plain SGD), then
`workers.training.engine.train` on the same device with the same seed (so the same Xavier init from
`models.build_model`), batch size, lr, epochs and training examples. An epoch's time covers
training and validation, as d2l's `fit_epoch` does; cnnserve's checkpoint write after each
epoch is outside it (it is in `wall_s`). Per model it reports the median epoch time, training
images per second, the final validation accuracy (mean over seeds) and the speed ratio; it
writes JSON, a PNG bar plot next to it, and a markdown table into `docs/benchmarks.md`.

    python -m bench train --device cpu --models lenet --epochs 2 --out docs/bench-train-cpu.json

`--models` defaults to every registered network (the seed's three, then the rest of the
book's chapter 8). `--epochs`, `--d2l-epochs`, `--train-limit`, `--val-limit` and
`--input-size` take one number or per-model values (`lenet=60000,vgg=1024,resnet18=1024`;
`all` or `0` for no limit, or for the input size the book's resize of each model). On a GPU
the d2l way is 10-25x slower: `--d2l-epochs 2 --d2l-seeds 0` times it on fewer epochs and one
seed while cnnserve trains the full recipe on every seed (its val_acc is then not compared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.d2l_way import train_d2l_way
from bench.machine import core_count, cpu_name
from bench.stores import bench_redis, open_store
from models import get_model_entry, list_models
from workers.contracts import JobSpec
from workers.settings import Settings
from workers.store.jobs import new_job_id
from workers.training.data import FashionMNIST, load_fashion_mnist
from workers.training.engine import TrainOptions, resolve_device, train, train_subset

log = logging.getLogger(__name__)

#: The d2l way, cnnserve's engine as configured, and the engine with CUDA graphs off (ablation).
WAYS = ("d2l", "cnnserve", "cnnserve-eager")
DEFAULT_WAYS = ("d2l", "cnnserve")
DEFAULT_MODELS = tuple(list_models())
DOC = Path("docs/benchmarks.md")
DOC_SECTION = "## Training"
#: Spec goals, seconds per full epoch (60,000 training images).
GOALS_S: dict[str, dict[str, float]] = {
    "cpu": {"lenet": 5.0},
    "cuda": {"lenet": 0.15, "vgg": 1.5, "resnet18": 1.0},
}
FULL_TRAIN = 60000


def per_model(text: str, models: Sequence[str], what: str) -> dict[str, int | None]:
    """`"N"` or `"model=N,..."` as a value per model (None: no limit / the default)."""

    def value(raw: str) -> int | None:
        raw = raw.strip()
        if raw in ("all", "0", ""):
            return None
        number = int(raw)
        if number < 0:
            raise ValueError(f"{what} must be positive, got {number}")
        return number

    if "=" not in text:
        return dict.fromkeys(models, value(text))
    out: dict[str, int | None] = dict.fromkeys(models)
    for part in text.split(","):
        name, _, raw = part.partition("=")
        if name.strip() not in models:
            raise ValueError(f"{what}: {name.strip()!r} is not among --models {list(models)}")
        out[name.strip()] = value(raw)
    return out


def git_commit() -> str | None:
    """The checkout's commit (with `-dirty` when files differ), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "bench", "workers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine, versions, commit and date a result was measured with."""
    import torchvision

    cpu, cores = cpu_name(), core_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "load_average_start": list(os.getloadavg()),
    }


def run_d2l(
    spec: JobSpec, device: torch.device, data_dir: Path, val_limit: int | None, workers: int
) -> dict[str, Any]:
    """One d2l-way run on the same examples the engine trains on for this spec."""
    assert spec.input_size is not None and spec.lr is not None
    indices = train_subset(FULL_TRAIN, spec)
    started = time.perf_counter()
    result = train_d2l_way(
        spec.model,
        fashion_mnist_dir=data_dir,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        input_size=spec.input_size,
        seed=spec.seed,
        device=str(device),
        train_indices=indices.tolist() if indices is not None else None,
        val_limit=val_limit,
        num_workers=workers,
    )
    return {
        "epoch_s": [round(s, 4) for s in result.epoch_seconds],
        "train_loss": result.train_loss,
        "val_acc": result.val_acc,
        "images_per_epoch": result.images_per_epoch,
        "precision": "fp32",
        "wall_s": round(time.perf_counter() - started, 3),
    }


def run_cnnserve(
    spec: JobSpec, device: torch.device, data: FashionMNIST, options: TrainOptions
) -> dict[str, Any]:
    """One run of cnnserve's engine, checkpointing into a throw-away store."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-ckpt-") as tmp, bench_redis(Path(tmp)):
        result = train(
            spec,
            job_id=new_job_id(),
            data=data,
            store=open_store(Path(tmp) / "checkpoints"),
            options=options,
        )
    n = spec.train_limit or int(data.train_images.shape[0])
    return {
        "epoch_s": [m.seconds for m in result.history],
        "train_loss": [m.train_loss for m in result.history],
        "val_acc": [m.val_acc for m in result.history],
        "images_per_epoch": min(n, int(data.train_images.shape[0])),
        "precision": result.precision,
        "cuda_graph": result.cuda_graph,
        "cuda_graph_note": _graph_note(result.cuda_graph, result.cuda_graph_failure, spec, options),
        "outcome": str(result.outcome),
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _graph_note(captured: bool, failure: str | None, spec: JobSpec, options: TrainOptions) -> str:
    """Whether the training step replayed from a CUDA graph, and if not, why not."""
    if captured:
        return "captured"
    if failure is not None:
        return f"capture failed, trained eagerly: {failure}"
    if not options.cuda_graphs:
        return "off (eager steps asked for)"
    if not options.device.startswith("cuda"):
        return "not applicable: not a CUDA device"
    if options.compile:
        return "not applicable: torch.compile"
    return f"not applicable: optimizer {spec.optimizer} is not captured"


def summarize_way(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median epoch time over every epoch of every seed, images/s, mean final accuracy."""
    epochs = [s for r in runs for s in r["epoch_s"]]
    median = statistics.median(epochs)
    finals = [r["val_acc"][-1] for r in runs]
    images = runs[0]["images_per_epoch"]
    return {
        "median_epoch_s": round(median, 4),
        "min_epoch_s": round(min(epochs), 4),
        "images_per_s": round(images / median, 1),
        "epochs": len(runs[0]["epoch_s"]),
        "seeds": [r["seed"] for r in runs],
        "val_acc": round(statistics.fmean(finals), 4),
        "val_acc_per_seed": finals,
        "precision": runs[0]["precision"],
        # every run replayed a captured CUDA graph (cnnserve only; None for the d2l way)
        "cuda_graph": all(r["cuda_graph"] for r in runs) if "cuda_graph" in runs[0] else None,
        "cuda_graph_notes": sorted({r["cuda_graph_note"] for r in runs if "cuda_graph_note" in r}),
    }


def bench_model(
    name: str,
    *,
    device: torch.device,
    seeds: Sequence[int],
    epochs: int,
    d2l_epochs: int,
    d2l_seeds: Sequence[int],
    batch_size: int,
    train_limit: int | None,
    val_limit: int | None,
    data: FashionMNIST,
    input_size: int | None = None,
    data_dir: Path,
    loader_workers: int,
    options: TrainOptions,
    ways: Sequence[str] = DEFAULT_WAYS,
    on_run: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None,
) -> dict[str, Any]:
    """The chosen ways for one model over all seeds (alternating which goes first), summarized.

    The d2l way trains `d2l_epochs` on the seeds of `d2l_seeds` only. `on_run` gets every
    run so far after each one (so a report can be written before the model is done).
    """
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    if val_limit:
        n_val = min(val_limit, int(data.test_images.shape[0]))
        data = replace(
            data, test_images=data.test_images[:n_val], test_labels=data.test_labels[:n_val]
        )
    for i, seed in enumerate(seeds):
        spec = JobSpec(
            model=name,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device.type,
            train_limit=train_limit,
            input_size=input_size,
        )
        order = list(ways) if i % 2 == 0 else list(ways)[::-1]
        for way in order:
            if way == "d2l" and seed not in d2l_seeds:
                continue
            log.info("%s seed %d: training the %s way", name, seed, way)
            if way == "d2l":
                d2l_spec = spec.model_copy(update={"epochs": d2l_epochs})
                run = run_d2l(d2l_spec, device, data_dir, val_limit, loader_workers)
            elif way == "cnnserve-eager":
                run = run_cnnserve(spec, device, data, replace(options, cuda_graphs=False))
            else:
                run = run_cnnserve(spec, device, data, options)
            run["seed"] = seed
            run["load_average"] = list(os.getloadavg())
            log.info(
                "%s seed %d %s way: epochs %s s, val_acc %.4f",
                name,
                seed,
                way,
                run["epoch_s"],
                run["val_acc"][-1],
            )
            runs[way].append(run)
            if on_run is not None:
                on_run(runs)
    summary = {way: summarize_way(runs[way]) for way in ways if runs[way]}
    d2l, ours = summary.get("d2l"), summary.get("cnnserve")
    eager = summary.get("cnnserve-eager")
    entry = get_model_entry(name)
    n_train = runs[next(iter(summary))][0]["images_per_epoch"]
    goal = GOALS_S.get(device.type, {}).get(name)
    scaled = ours["median_epoch_s"] * FULL_TRAIN / n_train if ours else None
    return {
        "model": name,
        "input_size": spec.input_size,
        "lr": entry.lr,
        "batch_size": batch_size,
        "epochs": epochs,
        "seeds": list(seeds),
        "train_images": n_train,
        "val_images": val_limit or int(data.test_images.shape[0]),
        **summary,
        "speedup": _ratio(d2l, ours),
        # what the CUDA graph gives over eager steps, on the same seeds and epochs
        "graph_speedup": _ratio(eager, ours),
        # accuracies compare only after the same epochs on the same seeds
        "val_acc_delta": round(ours["val_acc"] - d2l["val_acc"], 4)
        if d2l and ours and (d2l["epochs"], d2l["seeds"]) == (ours["epochs"], ours["seeds"])
        else None,
        "goal_epoch_s": goal,
        "goal_met": (scaled <= goal)
        if goal is not None and scaled is not None and n_train == FULL_TRAIN
        else None,
        "runs": runs,
    }


def _ratio(slow: Mapping[str, Any] | None, fast: Mapping[str, Any] | None) -> float | None:
    """How many times faster `fast` ran an epoch than `slow` (None without both)."""
    if not slow or not fast:
        return None
    return round(slow["median_epoch_s"] / fast["median_epoch_s"], 2)


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown table with a line about the machine."""
    m = report["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    lines = [
        f"`{report['command']}`",
        "",
        f"{where}; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"{m['torch_threads']} torch thread(s); commit `{(m['git_commit'] or '?')[:12]}`; "
        f"{m['date']}; load average {_load(m.get('load_average_start'))} at the start, "
        f"{_load(m.get('load_average_end'))} at the end.",
        "",
        "| model | train / val images | epochs × seeds (d2l; cnnserve) | d2l way s/epoch "
        "| cnnserve s/epoch | speed-up | d2l img/s | cnnserve img/s | val_acc d2l "
        "| val_acc cnnserve | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "d2l" not in r or "cnnserve" not in r:
            continue  # an ablation or a window's short run: its numbers are in the JSON
        d, c = r["d2l"], r["cnnserve"]
        goal = "–"
        if r["goal_epoch_s"] is not None:
            verdict = {True: "met", False: "missed", None: "not a full epoch"}[r["goal_met"]]
            goal = f"≤ {r['goal_epoch_s']:g} s: {verdict}"
        lines.append(
            f"| {r['model']} ({r['input_size']}px) | {r['train_images']} / {r['val_images']} "
            f"| {_runs(r['runs']['d2l'])}; {_runs(r['runs']['cnnserve'])} "
            f"| {d['median_epoch_s']:.2f} "
            f"| {c['median_epoch_s']:.2f} | **{r['speedup']:.1f}×** | {d['images_per_s']:.0f} "
            f"| {c['images_per_s']:.0f} | {d['val_acc']:.4f} | {c['val_acc']:.4f} "
            f"({_how(c)}) | {goal} |"
        )
    return "\n".join(lines)


def _runs(runs: Sequence[Mapping[str, Any]]) -> str:
    return f"{len(runs[0]['epoch_s'])} × {len(runs)}"


def _how(way: Mapping[str, Any]) -> str:
    return way["precision"] + (", CUDA graph" if way.get("cuda_graph") else "")


def _load(values: Sequence[float] | None) -> str:
    return f"{values[0]:.1f}" if values else "?"


def update_doc(doc: Path, key: str, body: str) -> None:
    """Put `body` between this run's markers in `doc`, leaving everything else as it is.

    Without markers yet, the block goes at the end of the `## Training` section (created at the
    end of the file when missing).
    """
    start, end = f"<!-- bench-train:{key}:start -->", f"<!-- bench-train:{key}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    elif DOC_SECTION in text:
        head, _, rest = text.partition(DOC_SECTION)
        nxt = rest.find("\n## ")
        section, tail = (rest, "") if nxt < 0 else (rest[: nxt + 1], rest[nxt + 1 :])
        text = head + DOC_SECTION + section.rstrip("\n") + "\n\n" + block + "\n\n" + tail
    else:
        text = text.rstrip("\n") + f"\n\n{DOC_SECTION}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")


def plot(report: Mapping[str, Any], path: Path) -> None:
    """A grouped bar plot of median epoch time per model, d2l way vs cnnserve (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "d2l" in r and "cnnserve" in r]
    if not results:
        return
    names = [f"{r['model']} {r['input_size']}px\n{r['train_images']} img" for r in results]
    d2l = [r["d2l"]["median_epoch_s"] for r in results]
    ours = [r["cnnserve"]["median_epoch_s"] for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(results), 4.2))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], d2l, width, label="d2l way", color="#b0b0b0")
    ax.bar([x + width / 2 for x in xs], ours, width, label="cnnserve", color="#2a6fdb")
    for x, r in zip(xs, results, strict=True):
        top = max(r["d2l"]["median_epoch_s"], r["cnnserve"]["median_epoch_s"])
        ax.text(x, top * 1.15, f"{r['speedup']:.1f}×", ha="center", fontsize=10)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("median seconds per epoch (train + val)")
    m = report["machine"]
    where = m["gpu"] or f"{m['cores']}-core CPU"
    ax.set_title(f"Epoch time, {where}, batch {report['batch_size']}", fontsize=10)
    ax.set_ylim(top=max(d2l + ours) * 2.5)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--epochs", default="2", help="N or model=N,...")
    parser.add_argument(
        "--d2l-epochs", default=None, help="epochs of the d2l way (default: --epochs)"
    )
    parser.add_argument("--train-limit", default="all", help="training images: N or model=N,...")
    parser.add_argument("--val-limit", default="all", help="test images validated: N or model=N")
    parser.add_argument(
        "--input-size", default="all", help="N or model=N,... (default: the book's resize)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--d2l-seeds", default=None, help="seeds the d2l way runs (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: as is)")
    parser.add_argument("--loader-workers", type=int, default=4, help="the d2l way's DataLoader")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the engine")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="eager training steps on a GPU (ablation)"
    )
    parser.add_argument(
        "--ways",
        default=",".join(DEFAULT_WAYS),
        help=f"what to run per model and seed, of {', '.join(WAYS)} (cnnserve-eager: the "
        "engine with CUDA graphs off, beside `cnnserve` to measure what the graph gives)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments and the imports, write the report's skeleton, train nothing",
    )
    parser.add_argument("--fashion-mnist-dir", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default docs/bench-train-DEVICE.json)"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="do not touch the markdown file")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="train nothing: redraw the plot and table of earlier reports (e.g. a GPU run's); "
        "several (one per model, same machine) are merged into --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.render is not None:
        if len(args.render) > 1 and args.out is None:
            parser.error("--render with several reports needs --out for the merged one")
        reports = [json.loads(path.read_text()) for path in args.render]
        out = args.out or args.render[0]
        merged = merge_reports(reports)
        if len(reports) > 1:
            out.write_text(json.dumps(merged, indent=2) + "\n")
        publish(merged, out, args)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list_models()}")
    try:
        epochs = per_model(args.epochs, models, "--epochs")
        d2l_epochs = per_model(args.d2l_epochs or args.epochs, models, "--d2l-epochs")
        train_limits = per_model(args.train_limit, models, "--train-limit")
        val_limits = per_model(args.val_limit, models, "--val-limit")
        input_sizes = per_model(args.input_size, models, "--input-size")
        seeds = [int(s) for s in args.seeds.split(",")]
        d2l_seeds = [int(s) for s in (args.d2l_seeds or args.seeds).split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if not set(d2l_seeds) <= set(seeds):
        parser.error(f"--d2l-seeds {d2l_seeds} must be among --seeds {seeds}")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or not set(ways) <= set(WAYS):
        parser.error(f"--ways {args.ways!r}: choose among {', '.join(WAYS)}")
    command = "python -m bench train " + " ".join(sys.argv[2:] if argv is None else argv)
    report: dict[str, Any] = {
        "benchmark": "training",
        "command": command.strip(),
        "device": args.device,
        "batch_size": args.batch_size,
        "loader_workers": args.loader_workers,
        "compile": args.compile,
        "cuda_graphs": not args.no_cuda_graphs,
        "ways": ways,
        # false until every model has run: the report is written after every run
        "complete": False,
        "results": [],
    }
    out = args.out or Path(f"docs/bench-train-{args.device.partition(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        report["dry_run"] = True
        report["plan"] = [
            {"model": name, "ways": ways, "seeds": seeds, "epochs": epochs[name] or 2,
             "train_limit": train_limits[name], "val_limit": val_limits[name]}
            for name in models
        ]  # fmt: skip
        _write(out, report)
        sys.stdout.write(f"dry run: would train {', '.join(models)} ({', '.join(ways)}); {out}\n")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report["device"] = str(device)
    options = TrainOptions(
        device=str(device),
        keep_checkpoints=1,
        compile=args.compile,
        cuda_graphs=not args.no_cuda_graphs,
    )

    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-data-") as tmp:
        settings = Settings(data_dir=Path(tmp), **_data_dir_override(args.fashion_mnist_dir))
        data = load_fashion_mnist(settings)
        report["machine"] = machine_info(device)
        results: list[dict[str, Any]] = report["results"]
        for name in models:

            def written(runs: dict[str, list[dict[str, Any]]], name: str = name) -> None:
                _write(out, {**report, "running": {"model": name, "runs": runs}})

            results.append(
                bench_model(
                    name,
                    device=device,
                    seeds=seeds,
                    epochs=epochs[name] or 2,
                    d2l_epochs=d2l_epochs[name] or epochs[name] or 2,
                    d2l_seeds=d2l_seeds,
                    batch_size=args.batch_size,
                    train_limit=train_limits[name],
                    val_limit=val_limits[name],
                    input_size=input_sizes[name],
                    data=data,
                    data_dir=data.directory,
                    loader_workers=args.loader_workers,
                    options=options,
                    ways=ways,
                    on_run=written,
                )
            )
            _write(out, report)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["complete"] = True
    _write(out, report)
    publish(report, out, args)
    return 0


def _write(path: Path, report: Mapping[str, Any]) -> None:
    """Write the report whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reports of separate runs on one machine (a model each) as one; the first's machine."""
    if len(reports) == 1:
        return reports[0]
    devices = {r["device"] for r in reports}
    if len(devices) > 1:
        raise SystemExit(f"cannot merge reports from different devices: {sorted(devices)}")
    merged = dict(reports[0])
    merged["command"] = "; ".join(r["command"] for r in reports)
    merged["results"] = [result for r in reports for result in r["results"]]
    return merged


def publish(report: Mapping[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Draw the PNG next to `out`, put the table into the doc and print it."""
    table = markdown(report)
    if not args.no_plot:
        png = out.with_suffix(".png").resolve()
        plot(report, png)
        link = os.path.relpath(png, args.doc.resolve().parent)
        table += f"\n\n![epoch time per model]({link})"
    if not args.no_doc:
        update_doc(args.doc, out.stem, table)
    sys.stdout.write(table + "\n")
    sys.stdout.write(f"results in {out}\n")


def _data_dir_override(directory: Path | None) -> dict[str, Any]:
    return {} if directory is None else {"fashion_mnist_dir": directory}


if __name__ == "__main__":
    sys.exit(main())
