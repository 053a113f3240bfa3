"""The image transforms and checks on bytes alone (storage.images)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from storage.images import BadImage, ImageTransform, check_image, decode_to, open_image


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


@pytest.fixture
def gradient() -> np.ndarray:
    x = np.linspace(0, 255, 64, dtype=np.float32)
    return np.stack([np.add.outer(x * 0, x), np.add.outer(x, x * 0), np.full((64, 64), 128.0)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_and_garbage_bytes_are_bad(gradient, fmt):
    data = _encode(gradient, fmt)
    check_image(data)
    with pytest.raises(BadImage):
        check_image(data[: len(data) // 2])
    with pytest.raises(BadImage, match="not a JPEG, PNG or WebP"):
        check_image(b"no image here" * 20)
    with pytest.raises(BadImage, match="a GIF image; allowed: JPEG, PNG, WebP"):
        check_image(_encode(gradient, "GIF"))


def test_validation_transform_is_a_normalised_centre_crop(gradient):
    data = _encode(gradient, "PNG")
    out = ImageTransform(size=32, resize=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(pa.array([data, data]))
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.float32
    expected = (gradient[16:48, 16:48].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    staged = np.stack([decode_to(data, 32)] * 2)  # --decode 32: the same pixels once resized 64 -> 32
    assert staged.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(ImageTransform(size=32)(staged)[0], ImageTransform(size=32, resize=32)(pa.array([data]))[0],
                               atol=1e-5)


def test_train_transform_crops_and_flips_at_random_but_reproducibly(gradient):
    data = pa.array([_encode(gradient, "PNG")] * 16)
    a = ImageTransform(size=32, resize=48, train=True, seed=1, threads=1)(data)
    b = ImageTransform(size=32, resize=48, train=True, seed=1, threads=4)(data)
    np.testing.assert_array_equal(a, b)  # the pool does not change what each image gets
    assert len({row.tobytes() for row in a}) > 1  # crops and flips differ across the batch
    flipped = ImageTransform(size=32, train=True, seed=0)(np.stack([gradient.transpose(2, 0, 1)] * 16))
    plain = ImageTransform(size=32)(np.stack([gradient.transpose(2, 0, 1)] * 16))
    same = [(f == p).all() for f, p in zip(flipped, plain)]
    mirrored = [(f == p[..., ::-1]).all() for f, p in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_jpeg_draft_decode_keeps_the_requested_side(gradient):
    big = np.kron(gradient, np.ones((8, 8, 1), dtype=np.uint8))  # 512 x 512
    img = open_image(_encode(big, "JPEG"), min_side=100)
    assert min(img.size) >= 100 and img.size[0] < 512  # decoded at a reduced DCT scale
