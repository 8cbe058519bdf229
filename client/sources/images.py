"""Decoding one site image into the RGB picture the image processor expects, or a `BadSample`.

Handled: missing or unreadable files, truncated files (PIL refuses to decode them),
decompression bombs (more than `MAX_IMAGE_PIXELS` pixels, checked from the header before any
pixel is decoded), and modes other than RGB: CMYK and greyscale convert, palette images
go through RGBA so transparency is dropped the same way as for RGBA, and 16-bit
greyscale is scaled to 8 bits (a plain conversion would clip it to white).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fedcmp.client.sources.base import BadSample

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own warning threshold (a 9459 x 9459 picture)


def load_rgb(image: Path | bytes, where: str) -> Image.Image:
    """The decoded RGB picture of `image` (a file or encoded bytes); `where` names it in errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(image if isinstance(image, Path) else io.BytesIO(image))
        with opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample(f"{where}: decompression bomb ({width} x {height} pixels, more than "
                                f"{MAX_IMAGE_PIXELS})")
            opened.load()
            return _to_rgb(opened)
    except FileNotFoundError as error:
        raise BadSample(f"{where}: image file not found: {image}") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadSample(f"{where}: decompression bomb ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated, broken
        if isinstance(error, BadSample):
            raise
        raise BadSample(f"{where}: cannot decode image: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greyscale (PNG, TIFF), opened as I;16 or I
        pixels = np.asarray(image, dtype=np.float64)  # [H, W] in 0 .. 65535
        grey = np.clip(pixels / 257.0 + 0.5, 0, 255).astype(np.uint8)  # [H, W] in 0 .. 255
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")
