"""Decoding images the same way everywhere: checked, oriented, converted to RGB, resized square."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

__all__ = ["BadImage", "open_rgb", "square", "ScanResult", "scan_images", "phash_bits", "thumbnail", "THUMB"]

#: Side of the colour thumbnails that confirm a pHash match (a near-duplicate matches in colour too).
THUMB = 16

# A decompression bomb is a corrupt input here, not a reason to allocate gigabytes.
Image.MAX_IMAGE_PIXELS = 1 << 28


class BadImage(ValueError):
    """The file cannot be used as an image; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, RGBA, palette and 16-bit images become 8-bit RGB (16-bit scaled, not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode fully (truncation is caught here, not mid-epoch), apply EXIF orientation, RGB."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            text = f"truncated image ({text})"
        raise BadImage(text) from None


def square(img: Image.Image, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Centre-crop ``crop_pct`` of each side, then resize to ``size`` x ``size`` (uint8 HWC).

    The whole image is squashed to a square rather than cropped to one, so a defect near the
    border is never cut away; ``crop_pct`` < 1 trims a border deliberately.
    """
    if crop_pct < 1.0:
        w, h = img.size
        cw, ch = max(1, round(w * crop_pct)), max(1, round(h * crop_pct))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def phash_bits(img: Image.Image | np.ndarray) -> int:
    """64-bit perceptual hash (DCT of an 8x8 low-pass) as an integer, for Hamming distances."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    return int.from_bytes(np.packbits(imagehash.phash(img).hash.flatten()).tobytes(), "big")


def thumbnail(img: Image.Image | np.ndarray) -> np.ndarray:
    """A THUMB x THUMB colour thumbnail (uint8), to confirm near-duplicates found by pHash."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    return np.asarray(img.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)


@dataclass
class ScanResult:
    """Per file: the error (None when fine), its perceptual hash and colour thumbnail, optionally
    the decoded pixels, and its (width, height) as decoded (EXIF orientation applied)."""

    error: str | None
    phash: int | None = None
    pixels: np.ndarray | None = None
    thumb: np.ndarray | None = None
    size: tuple[int, int] | None = None


def _scan_one(path: str, keep_size: int | None, crop_pct: float) -> ScanResult:
    try:
        img = open_rgb(path)
    except BadImage as exc:
        return ScanResult(str(exc))
    pixels = square(img, keep_size, crop_pct) if keep_size else None
    return ScanResult(None, phash_bits(img), pixels, thumbnail(img), img.size)


def scan_images(paths: list[str], keep_size: int | None = None, crop_pct: float = 1.0,
                workers: int | None = None, desc: str = "scan images") -> list[ScanResult]:
    """Decode every image once (threads: PIL releases the GIL while decoding)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: _scan_one(p, keep_size, crop_pct), paths)
        return list(tqdm(results, total=len(paths), desc=desc, unit="img", leave=False, disable=True if len(paths) < 200 else None))  # None: bars on a terminal only
