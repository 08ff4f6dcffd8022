"""The CUDA fast path (bf16 autocast, channels_last, data on the device); skipped without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import FASHION_MNIST_DIR
from tests.workers.helpers import lenet_spec
from workers.checkpoints import CheckpointStore
from workers.contracts import JobSpec
from workers.data import FashionMNIST, load_fashion_mnist
from workers.engine import Outcome, TrainOptions, train
from workers.jobs import new_job_id
from workers.settings import Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> FashionMNIST:
    where = tmp_path_factory.mktemp("data")
    return load_fashion_mnist(Settings(fashion_mnist_dir=FASHION_MNIST_DIR, data_dir=where))


def test_lenet_trains_in_bf16_on_the_gpu_and_gives_its_memory_back(
    data: FashionMNIST, tmp_path: Path
) -> None:
    store = CheckpointStore(tmp_path)
    before = torch.cuda.memory_allocated()
    spec = lenet_spec(
        epochs=3, train_limit=8192, batch_size=32, device="cuda", optimizer="adamw", lr=0.01
    )
    result = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cuda"))

    assert result.outcome is Outcome.completed and result.device == "cuda:0"
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result.history[-1].val_acc > 0.6
    assert torch.cuda.memory_allocated() <= before  # data, model and optimizer released
    # the checkpoint serves on the CPU and agrees with the recorded accuracy (bf16 vs fp32)
    model, manifest = store.load_model(result.latest_checkpoint or "")
    with torch.inference_mode():
        pred = model(data.test_images.unsqueeze(1).float() / 255).argmax(1)
    acc = (pred == data.test_labels).float().mean().item()
    assert acc == pytest.approx(manifest.metrics["val_acc"], abs=0.02)


@pytest.mark.parametrize("model", ["resnet18", "vgg"])
def test_conv_nets_train_resized_on_the_device(
    model: str, data: FashionMNIST, tmp_path: Path
) -> None:
    spec = JobSpec(model=model, epochs=1, train_limit=1024, device="cuda")
    result = train(spec, job_id=new_job_id(), data=data, store=CheckpointStore(tmp_path))
    assert result.outcome is Outcome.completed
    assert math.isfinite(result.history[0].train_loss)


@pytest.mark.slow
def test_torch_compile_path(data: FashionMNIST, tmp_path: Path) -> None:
    spec = lenet_spec(epochs=1, train_limit=4096, device="cuda")
    options = TrainOptions("cuda", compile=True)
    result = train(
        spec, job_id=new_job_id(), data=data, store=CheckpointStore(tmp_path), options=options
    )
    assert result.outcome is Outcome.completed
    model, _ = CheckpointStore(tmp_path).load_model(result.latest_checkpoint or "")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
