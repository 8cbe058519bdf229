"""Each kind of bad or unusual image: refused with a reason, or converted to the RGB the tower expects."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcmp.client.sources import BadSample
from fedcmp.client.sources.images import MAX_IMAGE_PIXELS, load_rgb


def _encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_decompression_bomb_is_refused_before_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    bomb = _encoded(Image.new("1", (side, side)))  # a few kB of PNG, 89 M pixels once decoded
    assert len(bomb) < 100_000
    with pytest.raises(BadSample, match="decompression bomb"):
        load_rgb(bomb, "bomb.png")


def test_truncated_file_is_refused() -> None:
    data = _encoded(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(BadSample, match="cut.png: cannot decode image"):
        load_rgb(data[: len(data) // 2], "cut.png")


def test_missing_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(BadSample, match="image file not found"):
        load_rgb(tmp_path / "gone.png", "gone")
    with pytest.raises(BadSample, match="cannot decode image"):
        load_rgb(b"this is not an image", "text")


def test_cmyk_and_palette_become_rgb() -> None:
    cmyk = load_rgb(_encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"), "cmyk")
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0, 0] > 200 and np.asarray(cmyk)[0, 0, 1] < 60  # red
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    rgb = load_rgb(_encoded(palette), "palette")
    assert rgb.mode == "RGB" and tuple(np.asarray(rgb)[1, 1]) == (30, 60, 90)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    pixels = np.array([[0, 32896, 65535]], dtype=np.uint16)  # black, mid grey, white
    image = load_rgb(_encoded(Image.fromarray(pixels)), "sixteen")
    assert image.mode == "RGB" and np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]
