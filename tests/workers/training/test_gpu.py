"""The CUDA fast path (bf16, channels_last, device-resident data, CUDA graphs); needs a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from tests.workers.helpers import lenet_spec
from workers.contracts import JobSpec
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import new_job_id
from workers.training.data import FashionMNIST
from workers.training.engine import Outcome, TrainOptions, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def allocated() -> int:
    """GPU memory held by tensors, less cuBLAS's workspaces.

    cuBLAS takes its workspace through PyTorch's allocator the first time a matrix product
    runs, and `empty_cache()` does not free it: a run that gave back all it had would still
    seem to keep a few MB. torch's own leak checks clear the workspaces first; so do we.
    """
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    return torch.cuda.memory_allocated()


def test_lenet_trains_in_bf16_on_the_gpu_and_gives_its_memory_back(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    before = allocated()
    spec = lenet_spec(
        epochs=3, train_limit=8192, batch_size=32, device="cuda", optimizer="adamw", lr=0.01
    )
    result = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cuda"))

    assert result.outcome is Outcome.completed and result.device == "cuda:0"
    assert not result.cuda_graph  # AdamW's step is not captured
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result.history[-1].val_acc > 0.6
    assert allocated() <= before  # data, model and optimizer released
    # the checkpoint serves on the CPU and agrees with the recorded accuracy (bf16 vs fp32)
    model, manifest = store.load_model(result.latest_checkpoint or "")
    with torch.inference_mode():
        pred = model(data.test_images.unsqueeze(1).float() / 255).argmax(1)
    acc = (pred == data.test_labels).float().mean().item()
    assert acc == pytest.approx(manifest.metrics["val_acc"], abs=0.02)


@pytest.mark.parametrize("model", ["resnet18", "vgg"])
def test_conv_nets_train_resized_on_the_device(
    model: str, data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    spec = JobSpec(model=model, epochs=1, train_limit=1024, device="cuda")
    result = train(spec, job_id=new_job_id(), data=data, store=checkpoint_store)
    assert result.outcome is Outcome.completed
    assert result.cuda_graph  # dropout (VGG) and batch norm (ResNet) replay from the graph
    assert math.isfinite(result.history[0].train_loss)


def test_sgd_steps_replay_from_a_cuda_graph_and_learn_as_eager_steps_do(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    # 64 full batches and a partial one per epoch; fp32 so both ways compute the same thing
    spec = lenet_spec(epochs=3, train_limit=64 * 128 + 50, device="cuda", precision="fp32", lr=0.5)
    before = allocated()
    graphed = train(spec, job_id=new_job_id(), data=data, store=store, options=TrainOptions("cuda"))
    assert allocated() <= before  # the graph's pool went with the run
    eager = train(
        spec,
        job_id=new_job_id(),
        data=data,
        store=store,
        options=TrainOptions("cuda", cuda_graphs=False),
    )
    assert graphed.cuda_graph and not eager.cuda_graph
    assert graphed.cuda_graph_failure is None
    # the sigmoid LeNet sits on its plateau for these three epochs (val_acc 0.10-0.13 at any
    # lr that keeps it stable), so no absolute accuracy: the graph must learn what eager does
    for g, e in zip(graphed.history, eager.history, strict=True):
        assert g.train_loss == pytest.approx(e.train_loss, rel=0.05)
        assert g.val_acc == pytest.approx(e.val_acc, abs=0.03)


def test_a_graphed_momentum_run_resumes_from_its_checkpoint(
    data: FashionMNIST, checkpoint_store: CheckpointStore
) -> None:
    store = checkpoint_store
    spec = lenet_spec(epochs=2, train_limit=32 * 128, device="cuda", optimizer="sgd_momentum")
    job = new_job_id()
    first = train(spec.model_copy(update={"epochs": 1}), job_id=job, data=data, store=store)
    assert first.cuda_graph
    resumed = train(spec, job_id=job, data=data, store=store, resume_from=f"{job}-e001")
    assert resumed.outcome is Outcome.completed and resumed.cuda_graph
    assert resumed.history[-1].train_loss < resumed.history[0].train_loss


@pytest.mark.slow
def test_torch_compile_path(data: FashionMNIST, checkpoint_store: CheckpointStore) -> None:
    spec = lenet_spec(epochs=1, train_limit=4096, device="cuda")
    options = TrainOptions("cuda", compile=True)
    result = train(spec, job_id=new_job_id(), data=data, store=checkpoint_store, options=options)
    assert result.outcome is Outcome.completed
    model, _ = checkpoint_store.load_model(result.latest_checkpoint or "")
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
