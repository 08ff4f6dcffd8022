"""The one preprocessing (`workers.preprocessing.Transform`): what training, `/v1`, `/v2` and
explain all do to an image before the network, built from a checkpoint's manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.service.checkpoint_helpers import FIRST_MANIFEST, fashion_test_set
from workers.preprocessing import InvertMode, PreprocessMode, Transform, should_invert
from workers.store.checkpoints import Manifest, Preprocessing


def preprocess(
    pixels: np.ndarray, prep: Preprocessing, invert: InvertMode, mode: PreprocessMode = "auto"
) -> np.ndarray:
    """One decoded image as the server hands it to the network: 1×28×28 float32."""
    transform = Transform(prep)
    return transform.scale(transform.native(pixels, invert, mode)[None])[0]


def test_preprocess_equals_training_for_28x28_and_inverts_light_backgrounds() -> None:
    img = fashion_test_set()[0][0]
    prep = Preprocessing(resize=28)
    x = preprocess(img, prep, "auto")
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert np.array_equal(x[0], img.astype(np.float32) * np.float32(1 / 255))
    assert not should_invert(img, "auto")
    assert should_invert(255 - img, "auto")
    assert np.array_equal(preprocess(255 - img, prep, "auto"), x)
    inverted = preprocess(255 - img, prep, "false")[0]
    assert np.array_equal(inverted, (255 - img) * np.float32(1 / 255))


def test_preprocess_pads_with_black_then_scales_to_28() -> None:
    img = fashion_test_set()[0][0]
    top = img[:14]  # 14×28: padded to 28×28 with 7 black rows above and below, no resize
    expected = np.zeros((28, 28), np.float32)
    expected[7:21] = top * np.float32(1 / 255)
    assert np.array_equal(preprocess(top, Preprocessing(resize=28), "false")[0], expected)
    big = np.kron(img, np.ones((4, 4), np.uint8))  # 112×112 → Lanczos back to 28×28
    back = preprocess(big, Preprocessing(resize=28), "false", "none")[0] * 255
    assert np.abs(back - img).mean() < 4


def test_a_large_image_goes_through_fashion_mnists_own_conversion() -> None:
    img = fashion_test_set()[0][1]  # a pullover, light on black, touching two edges
    photo = np.full((300, 260, 3), 250, np.uint8)  # a dark garment on off-white, margins
    garment = np.kron(255 - img, np.ones((8, 8), np.uint8))  # 224×224
    photo[40:264, 20:244] = np.minimum(garment, 250)[..., None]
    back = preprocess(photo, Preprocessing(resize=28), "auto")[0] * 255
    # trimmed to the garment, subsampled to 28, negated: the data set's image again
    assert np.abs(back - img).mean() < 12  # sharpened once more, as the data set was
    padded = preprocess(photo, Preprocessing(resize=28), "auto", "none")[0] * 255
    assert np.abs(padded - img).mean() > 3 * np.abs(back - img).mean()
    kept = Preprocessing(resize=28, photos="pad-resize")  # a manifest that asks for padding
    assert np.array_equal(preprocess(photo, kept, "auto"), preprocess(photo, kept, "auto", "none"))


@pytest.mark.parametrize(
    ("resize", "mean", "std"), [(28, 0.0, 1.0), (56, 0.0, 1.0), (96, 0.2860, 0.3530)]
)
def test_serving_and_training_give_the_network_the_same_floats(
    resize: int, mean: float, std: float
) -> None:
    """The server scales on the host (numpy) and resizes inside its graph; training does both
    on the device (torch): the same bits either way, for every pixel value."""
    transform = Transform(Preprocessing(resize=resize, mean=mean, std=std))
    images = np.concatenate([np.arange(256, dtype=np.uint8).repeat(4)[:784].reshape(1, 28, 28),
                             fashion_test_set()[0][:7]])  # fmt: skip
    served = transform.resize(torch.from_numpy(transform.scale(images)))
    trained = transform(torch.from_numpy(images))
    assert served.shape == trained.shape == (8, 1, resize, resize)
    assert torch.equal(served, trained)


def test_the_manifest_says_what_invert_auto_means() -> None:
    img = fashion_test_set()[0][0]
    dark_on_light = 255 - img
    auto = Transform(Preprocessing(resize=28))  # every manifest so far: the border rule
    assert np.array_equal(auto.native(dark_on_light, "auto"), img)
    assert np.array_equal(auto.native_batch(dark_on_light[None], "auto")[0], img)
    never = Transform(Preprocessing(resize=28, invert="false"))
    assert np.array_equal(never.native(dark_on_light, "auto"), dark_on_light)
    assert np.array_equal(never.native_batch(dark_on_light[None], "auto")[0], dark_on_light)
    assert np.array_equal(never.native(dark_on_light, "true"), img)  # the request decides


def test_a_manifest_as_the_first_version_wrote_it_loads_and_preprocesses_the_same() -> None:
    manifest = Manifest.model_validate_json(FIRST_MANIFEST.read_bytes())
    assert "grayscale" not in manifest.preprocessing.model_dump()
    assert manifest.preprocessing == Preprocessing(resize=28)
    img = fashion_test_set()[0][2]
    for pixels in (img, 255 - img, np.kron(img, np.ones((3, 3), np.uint8))):
        assert np.array_equal(
            preprocess(pixels, manifest.preprocessing, "auto"),
            preprocess(pixels, Preprocessing(resize=28), "auto"),
        )
