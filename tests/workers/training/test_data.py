"""Fashion-MNIST loading: the real files, their checksums, and errors a person can act on."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from workers.errors import DataError
from workers.settings import Settings
from workers.training.data import FILES, STAMP_NAME, TRAIN_LABELS, clear_cache, load_fashion_mnist


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_cache()


def copy_dataset(settings: Settings, to: Path) -> Settings:
    to.mkdir()
    for f in FILES:
        shutil.copy(settings.fashion_mnist_dir / f.name, to / f.name)
    return settings.model_copy(update={"fashion_mnist_dir": to})


def test_loads_the_real_data_set_as_uint8_tensors(settings: Settings) -> None:
    data = load_fashion_mnist(settings)
    assert data.train_images.shape == (60000, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10000, 28, 28) and data.test_images.dtype == torch.uint8
    assert data.train_labels.shape == (60000,) and data.test_labels.shape == (10000,)
    # Fashion-MNIST's published first labels: ankle boot, t-shirt, t-shirt, dress, ...
    assert data.train_labels[:6].tolist() == [9, 0, 0, 3, 0, 2]
    assert data.test_labels[:6].tolist() == [9, 2, 1, 1, 6, 1]
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert int(data.train_images.max()) == 255
    assert data.describe()["idx_md5"]["train-images-idx3-ubyte"] == (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a"
    )
    # verified once: the verdict is kept next to the checkpoints, keyed by size and mtime
    stamp = json.loads((settings.data_dir / STAMP_NAME).read_text())
    assert len(stamp) == 4
    assert all({"size", "mtime_ns", "raw_md5"} <= set(v) for v in stamp.values())
    assert load_fashion_mnist(settings) is data  # cached in the process


def test_a_file_with_the_wrong_content_fails_its_checksum(
    settings: Settings, tmp_path: Path
) -> None:
    local = copy_dataset(settings, tmp_path / "fm")
    labels = tmp_path / "fm" / TRAIN_LABELS.name
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed, still a well-formed IDX file
    labels.write_bytes(gzip.compress(bytes(raw)))

    with pytest.raises(DataError) as err:
        load_fashion_mnist(local)
    message = str(err.value)
    assert str(labels) in message and "checksum" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_a_truncated_file_is_reported_as_damaged(settings: Settings, tmp_path: Path) -> None:
    local = copy_dataset(settings, tmp_path / "fm")
    images = tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is damaged"):
        load_fashion_mnist(local)


def test_a_missing_file_is_named_with_how_to_get_it(settings: Settings, tmp_path: Path) -> None:
    local = copy_dataset(settings, tmp_path / "fm")
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(local)
    assert "train-labels-idx1-ubyte.gz is missing" in str(err.value)
    assert "CNNSERVE_FASHION_MNIST_DIR" in str(err.value)


def test_a_missing_directory_says_which_setting_to_fix(settings: Settings, tmp_path: Path) -> None:
    local = settings.model_copy(update={"fashion_mnist_dir": tmp_path / "nowhere"})
    with pytest.raises(DataError) as err:
        load_fashion_mnist(local)
    assert f"{tmp_path / 'nowhere'} does not exist" in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
