"""The job spec's bounds, and `cnnserve train` as a person runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from models import list_models
from workers.contracts import TRUSTED, JobSpec, network_fit
from workers.local_redis import free_port, redis_answers, redis_for
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore
from workers.training.cli import run_train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 101}, "epochs"),
        ({"batch_size": 2048}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"input_size": 20}, "input_size"),
        ({"input_size": 512}, "input_size"),
        ({"train_limit": 0}, "train_limit"),
        ({"val_limit": 0}, "val_limit"),
        ({"val_limit": 10001}, "val_limit"),
        ({"device": "gpu"}, "device"),
        ({"precision": "fp16"}, "precision"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"seed": -1}, "seed"),
    ],
)
def test_a_spec_out_of_bounds_names_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({"model": "lenet", **fields})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_an_input_too_small_for_the_model_is_refused() -> None:
    with pytest.raises(ValidationError, match="input_size 28 does not fit vgg"):
        JobSpec(model="vgg", input_size=28)


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "resnet18", "input_size": 32, "batch_size": 1},
        {"model": "resnet18", "input_size": 28, "train_limit": 1},
    ],
    ids=["batch_size", "train_limit"],
)
def test_a_batch_that_batchnorm_cannot_train_on_is_refused(fields: dict[str, object]) -> None:
    # ResNet-18's last stage is 1×1 below 64 px: one example leaves one value per channel
    with pytest.raises(ValidationError, match=r"BatchNorm layer net\.b5\.0\.bn1 .* single"):
        JobSpec.model_validate(fields)
    assert JobSpec.model_validate({**fields, "input_size": 96}).input_size == 96
    assert JobSpec.model_validate({**fields, "model": "lenet", "input_size": 28}).model == "lenet"


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        (
            {"model": "alexnet", "input_size": 64},
            "does not fit alexnet: it needs an input_size of 65 or more",
        ),
        (
            {"model": "nin", "input_size": 66},
            "does not fit nin: it needs an input_size of 67 or more",
        ),
        (
            {"model": "densenet", "input_size": 28},
            "does not fit densenet: it needs an input_size of 29 or more",
        ),
        (
            {"model": "vgg", "input_size": 31},
            "does not fit vgg: it needs an input_size of 32 or more",
        ),
        (
            {"model": "densenet", "input_size": 60, "arch": {"growth_rate": 8, "arch": [1] * 5}},
            'densenet with arch {"num_channels": 64, "growth_rate": 8, "arch": [1, 1, 1, 1, 1]}: '
            "it needs an input_size of 61 or more",
        ),
        (
            {"model": "vgg", "arch": [[1, 4]] * 8},
            "no input_size up to 224 fits it",
        ),
    ],
)
def test_an_input_below_the_networks_smallest_says_the_smallest(
    fields: dict[str, object], said: str
) -> None:
    with pytest.raises(ValidationError, match="input_size") as err:
        JobSpec.model_validate(fields)
    assert said in str(err.value)
    if "no input_size" not in said:
        smallest = int(said.split("of ")[-1].split()[0])
        assert JobSpec.model_validate({**fields, "input_size": smallest}).input_size == smallest


def test_the_book_parameters_of_densenet_and_anynet_are_an_arch() -> None:
    spec = JobSpec.model_validate(
        {"model": "densenet", "arch": {"growth_rate": 8, "arch": [2, 2]}, "input_size": 28}
    )
    assert spec.network_arch == {"num_channels": 64, "growth_rate": 8, "arch": [2, 2]}
    named = JobSpec.model_validate({"model": "regnetx32", "arch": "regnetx32"})
    assert named.network_arch == {"stem_channels": 32, "arch": [[4, 32, 16, 1], [6, 80, 16, 1]]}
    # a record read back (the arch as the client wrote it) resolves to the same network
    again = JobSpec.model_validate(spec.model_dump(mode="json"), context=TRUSTED)
    assert again.arch_value == spec.arch_value and again.network_arch == spec.network_arch
    with pytest.raises(ValidationError, match="arch: DenseNet arch has no 'depth'"):
        JobSpec.model_validate({"model": "densenet", "arch": {"depth": 3}})
    with pytest.raises(ValidationError, match="arch: alexnet has a fixed architecture"):
        JobSpec.model_validate({"model": "alexnet", "arch": [[1, 2]]})


def test_a_record_read_back_is_trusted_and_checked_specs_are_not_rebuilt() -> None:
    # a spec the API refuses (VGG's five pools cannot take 28 px) ...
    refused = {"model": "vgg", "input_size": 28}
    with pytest.raises(ValidationError, match="does not fit vgg"):
        JobSpec.model_validate(refused)
    # ... is loaded as it is from a record: what is stored was checked when it was submitted
    assert JobSpec.model_validate(refused, context=TRUSTED).input_size == 28
    # and a network is built once per (model, arch, input size), however often it is checked
    network_fit.cache_clear()
    for _ in range(3):
        JobSpec.model_validate({"model": "resnet18", "input_size": 64})
    assert network_fit.cache_info().misses == 1 and network_fit.cache_info().hits == 2


def test_defaults_are_the_books_recipe() -> None:
    recipes = {m: JobSpec(model=m) for m in list_models()}
    assert {m: (s.lr, s.input_size) for m, s in recipes.items()} == {
        "lenet": (0.1, 28),
        "vgg": (0.01, 224),
        "resnet18": (0.01, 96),
        "alexnet": (0.01, 224),
        "nin": (0.05, 224),
        "googlenet": (0.01, 96),
        "bn_lenet": (0.1, 28),
        "densenet": (0.01, 96),
        "regnetx32": (0.05, 96),
    }
    spec = recipes["lenet"]
    assert (spec.epochs, spec.batch_size, spec.optimizer, spec.seed) == (10, 128, "sgd", 0)


def test_train_prints_a_metrics_table_and_keeps_checkpoints(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_train(
        {"model": "lenet", "epochs": 2, "train_limit": 500, "device": "cpu", "batch_size": 100}
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "val_loss", "val_acc", "seconds"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert "10/10" in err  # the progress bar reached the last batch
    assert "checkpoint" in out
    store = CheckpointStore.from_settings(settings)
    listed = [c.id for c in store.list()]
    assert len({c.partition("-")[0] for c in listed}) == 1 and listed[0].endswith("-e002")
    assert store.weights_path(listed[0]).is_file()  # where the API will find it
    store.close()


def test_train_with_a_bad_spec_exits_2_naming_the_field(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_train({"model": "lenet", "batch_size": 0}) == 2
    assert "batch_size" in capsys.readouterr().err


@pytest.mark.integration
def test_the_train_command_runs(settings: Settings) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--log-level",
            "WARNING",
            "train",
            "--model",
            "lenet",
            "--epochs",
            "1",
            "--train-limit",
            "2000",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[0] == "epoch"
    assert "16/16" in proc.stderr


def _train_command(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "service.cli", "--log-level", "WARNING", "train"),
            *("--model", "lenet", "--epochs", "1", "--train-limit", "500", "--device", "cpu"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
    )


@pytest.mark.integration
def test_the_train_command_starts_a_private_redis_when_none_answers(
    settings: Settings, tmp_path: Path
) -> None:
    # a laptop without Redis: nothing listens at the URL (a local one)
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    data_dir = tmp_path / "laptop"

    proc = _train_command({"CNNSERVE_REDIS_URL": url, "CNNSERVE_DATA_DIR": str(data_dir)})

    assert proc.returncode == 0, proc.stderr
    assert f"no Redis answers at {url}: started a private one" in proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == "1"  # the metrics table's epoch 1
    assert not redis_answers(url)  # stopped at the end: nothing left listening
    # the index outlived it: the next private Redis on that data dir (`cnnserve up`'s) has it
    with redis_for(url, data_dir.resolve(), "cnnserve up") as (again, private):
        assert private
        store = CheckpointStore.open(
            settings.checkpoint_url or data_dir.resolve() / "checkpoints",
            redis_url=again,
            cache_dir=data_dir / "cache",
        )
        (ckpt,) = store.list()
        assert ckpt.epoch == 1 and store.weights_path(ckpt.id).is_file()
        store.close()
    assert not redis_answers(url)


def test_the_train_command_says_what_to_do_when_no_redis_can_be_started(
    settings: Settings, tmp_path: Path
) -> None:
    proc = _train_command(
        {"CNNSERVE_REDIS_URL": "redis://redis.invalid:6379/0", "CNNSERVE_DATA_DIR": str(tmp_path)}
    )
    assert proc.returncode == 1
    assert "No Redis answers at redis://redis.invalid:6379/0" in proc.stderr
    assert "starts a private Redis only for a local URL" in proc.stderr
