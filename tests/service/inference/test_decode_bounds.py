"""What decoding a request's images may cost: memory (one image at a time, reduced as it is
decoded), the event loop's time (PNG text bounded; bytes, not only pixels, decide where it
runs), and how far the early reduction moves a photo's 28×28 result (a pixel's fraction)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.inference.decode import decoded_files
from service.inference.images import (
    MAX_PNG_TEXT_BYTES,
    ImageInputError,
    decode_image,
    reduced_image,
)
from service.inference.pipeline import decodes_inline
from tests.service.checkpoint_helpers import flat_png, png, text_bomb_png
from workers.preprocessing import DECODE_EDGE, Transform
from workers.settings import Settings
from workers.store.checkpoints import Preprocessing

REPO = Path(__file__).resolve().parents[3]

#: Decodes the PNG files named on its command line through the pipeline, as a /v1 request's
#: uploads are, and prints how far that raised the process's peak RSS over its RSS before.
#: (A process of its own: what one test measures, no other test has allocated before it.)
MEASURE = """
import asyncio, json, sys
from pathlib import Path
from service.inference.pipeline import Preparation, files_native
from workers.settings import Settings
from workers.store.checkpoints import Manifest, Preprocessing
from tests.service.checkpoint_helpers import flat_png

manifest = Manifest(id="0123456789abcdef-e001", job_id="0123456789abcdef", epoch=1,
                    model="lenet", input_size=28, preprocessing=Preprocessing(resize=28),
                    weights_sha256="0" * 64)
how, settings = Preparation(manifest), Settings()
blobs = [Path(p).read_bytes() for p in sys.argv[1:]]
asyncio.run(files_native([flat_png(300)], settings, how))  # every code path loaded

def status(field: str) -> int:  # kB; VmHWM is this program's own peak (ru_maxrss is not:
    # it keeps the peak of the process that forked it, pytest)
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))

before = status("VmRSS")
native = asyncio.run(files_native(blobs, settings, how))
peak = status("VmHWM")
print(json.dumps({"growth_mib": (peak - before) / 1024, "shape": list(native.shape)}))
"""


def rgba_png(side: int) -> bytes:
    """A side×side RGBA PNG, flat but for a half-transparent square (compresses to little)."""
    pixels = np.empty((side, side, 4), np.uint8)
    pixels[...] = (200, 40, 30, 255)
    pixels[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4, 3] = 128
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("files", "bound_mib"),
    [
        # the review's request: 4 flat 2048² RGB PNGs (68 KB) raised the API's peak by 306 MB
        pytest.param(lambda: [flat_png(2048, (200, 40 + i, 30)) for i in range(4)], 64, id="rgb"),
        # the default budget's worst: 4 × 4096² RGBA (64 MiB each at full resolution)
        pytest.param(lambda: [rgba_png(4096)] * 4, 128, id="rgba-4096"),
    ],
)
def test_large_photos_cost_a_fraction_of_their_full_resolution(
    tmp_path: Path, files: Callable[[], list[bytes]], bound_mib: int
) -> None:
    paths = []
    for i, blob in enumerate(files()):
        path = tmp_path / f"{i}.png"
        path.write_bytes(blob)
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *paths],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["shape"] == [4, 28, 28]
    # one image at full resolution while its decoder runs, a strip of it reduced; never floats
    assert measured["growth_mib"] < bound_mib, measured


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L"])
def test_reducing_in_strips_equals_pillows_reduce(mode: str) -> None:
    rng = np.random.default_rng(0)
    channels = {"RGBA": (4,), "RGB": (3,), "L": ()}[mode]
    im = Image.fromarray(rng.integers(0, 256, (1001, 777, *channels), dtype=np.uint8))
    for factor in (2, 3, 7):
        ours = reduced_image(im, max(im.size) // factor)
        assert np.array_equal(np.asarray(ours), np.asarray(im.reduce(factor))), factor


def test_images_are_decoded_one_at_a_time_and_reduced(settings: Settings) -> None:
    blobs = [flat_png(2048), flat_png(1000), png(np.zeros((28, 28), np.uint8))]
    images = decoded_files(blobs, settings)
    assert not isinstance(images, list)  # a generator: nothing decoded until asked
    shapes = [im.shape for im in images]
    # the longest edge reduced by a whole factor, staying at least DECODE_EDGE
    assert shapes == [(228, 228, 3), (250, 250, 3), (28, 28)]  # 2048 / 9 (a partial box), 1000 / 4
    assert all(max(s) >= DECODE_EDGE for s in shapes[:2])


def garment_photo(side: int) -> np.ndarray:
    """A dark, textured garment on off-white paper, with margins, side×side RGB."""
    rng = np.random.default_rng(side)
    photo = np.full((side, side, 3), 246, np.uint8)
    yy, xx = np.mgrid[:side, :side] / side
    inside = ((yy - 0.55) / 0.38) ** 2 + ((xx - 0.5) / 0.28) ** 2 < 1
    shade = 60 + 80 * xx + rng.integers(0, 20, (side, side))
    photo[inside] = np.stack([shade, shade * 0.8, shade * 0.6], axis=-1)[inside].astype(np.uint8)
    return photo


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_early_reduction_moves_a_photos_28x28_result_by_a_fraction_of_a_pixel(
    fmt: str,
) -> None:
    transform = Transform(Preprocessing(resize=28))
    photo = garment_photo(1800)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    full = transform.native(decode_image(data, max_pixels=4096**2))
    reduced = transform.native(decode_image(data, max_pixels=4096**2, reduce_to=DECODE_EDGE))
    diff = np.abs(full.astype(int) - reduced.astype(int))
    # the same garment in the same place: the outline may move a fraction of a pixel, its
    # texture (averaged now, subsampled before) by a few levels
    assert (full > 0).sum() == pytest.approx((reduced > 0).sum(), rel=0.06)
    assert diff.mean() < 8, diff.mean()


def test_a_16_bit_and_a_palette_png_reduce_as_they_convert(settings: Settings) -> None:
    gray16 = (np.arange(600 * 600, dtype=np.uint32).reshape(600, 600) % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")  # mode I;16
    reduced = decode_image(buf.getvalue(), max_pixels=10**6, reduce_to=DECODE_EDGE)
    full = decode_image(buf.getvalue(), max_pixels=10**6)
    assert reduced.shape == (300, 300) and reduced.dtype == np.uint8
    assert abs(float(reduced.mean()) - float(full.mean())) < 2  # still scaled from 65535

    palette = Image.fromarray(garment_photo(600)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    rgb = decode_image(buf.getvalue(), max_pixels=10**6, reduce_to=DECODE_EDGE)
    assert rgb.shape == (300, 300, 3) and rgb.dtype == np.uint8


# --- PNG text and the event loop -------------------------------------------------------------


def test_a_png_whose_text_expands_past_the_bound_is_refused_after_little_zlib_work() -> None:
    bomb = text_bomb_png()  # 64 KB declaring 1×1, 64 MB of zTXt: 0.2 s of zlib under Pillow's
    assert len(bomb) < 80_000
    with pytest.raises(ImageInputError) as refused:
        decode_image(bomb, max_pixels=4096**2)
    assert refused.value.status == 422
    assert "text chunks" in refused.value.detail and str(MAX_PNG_TEXT_BYTES) in refused.value.detail
    # a PNG with a little text is fine
    small = text_bomb_png(chunks=2, text_bytes=1000)
    assert decode_image(small, max_pixels=100).shape == (1, 1)


def test_only_small_files_of_few_pixels_are_decoded_on_the_event_loop() -> None:
    tiny = png(np.zeros((28, 28), np.uint8))
    assert decodes_inline([tiny], [28 * 28])
    bomb = text_bomb_png()  # declares 1 pixel, but 64 KB of compressed chunks
    assert not decodes_inline([bomb], [1])
    assert not decodes_inline([tiny] * 8, [28 * 28] * 8)  # the pixels in all count


def test_a_photo_reduced_on_its_way_in_is_still_turned_upright_by_its_exif() -> None:
    """A photo is stored sideways with an EXIF Orientation; reducing it (a new image) must
    keep what turns it upright (it was lost: the photo was classified lying down)."""
    sideways = Image.fromarray(np.zeros((600, 1200, 3), np.uint8))  # 1200 wide, 600 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    sideways.save(buf, format="PNG", exif=exif)
    full = decode_image(buf.getvalue(), max_pixels=10**7)
    reduced = decode_image(buf.getvalue(), max_pixels=10**7, reduce_to=DECODE_EDGE)
    assert full.shape[:2] == (1200, 600)  # upright: tall
    assert reduced.shape[0] > reduced.shape[1], reduced.shape


def test_the_headers_of_a_big_upload_are_read_off_the_event_loop(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JPEG's header is found by walking its markers in Python: 4 MB of empty APP1
    segments took 2 s. Only uploads of a few KiB in all have their headers read on the loop."""
    import asyncio
    import threading

    from service.inference import decode, pipeline

    seen: list[str] = []
    real = decode.declared_files

    def recording(blobs: list[bytes], s: Settings) -> list[int | None]:
        seen.append(threading.current_thread().name)
        return real(blobs, s)

    monkeypatch.setattr(pipeline, "declared_files", recording)
    how = pipeline.Preparation(
        manifest=None,  # type: ignore[arg-type]
    )
    monkeypatch.setattr(
        pipeline.Preparation,
        "transform",
        property(lambda self: Transform(Preprocessing(resize=28))),
    )
    tiny = png(np.zeros((28, 28), np.uint8))
    big = png(np.random.default_rng(0).integers(0, 255, (300, 300), np.uint8))
    assert len(big) > pipeline.INLINE_DECODE_BYTES
    for blobs in ([tiny], [big]):
        asyncio.run(pipeline.files_native(blobs, settings, how))
    assert seen[0] == threading.main_thread().name and seen[1] != threading.main_thread().name
