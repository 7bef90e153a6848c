"""Grayscale image IO: read 8/16-bit PNG and JPEG as float [0, 1]; write 16-bit PNG with provenance.

Why 16-bit: X-rays carry more than 256 gray levels, and a generated image that is written,
read and written again must not drift. `write_png16` quantises [0, 1] to round(x * 65535), and
`read_image` divides by 65535, so PNG -> float32 -> PNG is bit exact (65535 < 2**24, the
float32 mantissa, so the round trip never crosses a rounding boundary).

Provenance goes into PNG text chunks (tEXt when the value is Latin-1, iTXt otherwise), e.g.
synthetic=true, prompt, negative_prompt, seed, sampler, steps, guidance, model_hash,
megamed_version. Any str -> str dict is accepted; `read_png_text` returns it back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# float tolerance outside [0, 1] that write_png16 clips instead of rejecting (sampler round-off)
RANGE_TOLERANCE = 1e-3


def _pil():
    try:
        from PIL import Image, PngImagePlugin
    except ImportError as e:  # pillow is a core dependency, but say so plainly if it is gone
        raise ImportError("megamed image IO needs Pillow: pip install pillow") from e
    return Image, PngImagePlugin


def read_image(path: str | Path) -> np.ndarray:
    """float32 [H, W] in [0, 1] from an 8/16-bit grayscale PNG or a JPEG (colour -> luma).

    Raises FileNotFoundError / ValueError naming the file when it is missing or cannot be decoded.
    """
    Image, _ = _pil()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L"):       # 16-bit grayscale PNG
                arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
            elif mode == "I":                              # 32-bit int: Pillow's other name for 16-bit PNG data
                arr = np.asarray(im, dtype=np.int64)
                if arr.min() < 0 or arr.max() > 65535:
                    raise ValueError(f"integer pixel values outside 0..65535 ({arr.min()}..{arr.max()})")
                arr = arr.astype(np.float32) / 65535.0
            elif mode == "F":                              # float TIFF and friends: must already be [0, 1]
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                    raise ValueError("float image is not within [0, 1]")
            else:                                          # L, P, RGB, RGBA, LA, 1, CMYK, YCbCr (JPEG)
                if mode != "L":
                    im = im.convert("L")                   # ITU-R 601 luma for colour
                arr = np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:       # PIL raises all three on corrupt files
        raise ValueError(f"{path}: cannot read image: {e}") from e
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel image, got array shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _check_text(text: dict | None) -> dict[str, str]:
    if text is None:
        return {}
    if not isinstance(text, dict):
        raise ValueError(f"text: expected a dict[str, str] or None, got {type(text).__name__}")
    out = {}
    for key, value in text.items():
        # PNG keywords: 1-79 Latin-1 printable characters, no leading/trailing/double spaces
        if not isinstance(key, str) or not 1 <= len(key) <= 79 or key != key.strip() or "  " in key:
            raise ValueError(f"text: key {key!r} is not a valid PNG keyword (1-79 chars, no edge spaces)")
        try:
            key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"text: key {key!r} must be Latin-1 (PNG keyword rule)") from None
        if not isinstance(value, str):
            raise ValueError(f"text[{key!r}]: expected str, got {type(value).__name__} (convert it first)")
        out[key] = value
    return out


def write_png16(path: str | Path, img01: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write img01 (float [H, W] in [0, 1]) as a 16-bit grayscale PNG, atomically (temp + rename).

    Values within RANGE_TOLERANCE outside [0, 1] are clipped; NaN/inf or values further out are a
    ValueError (a wrong [-1, 1] -> [0, 1] mapping should fail loudly, not be clipped away).
    """
    Image, PngImagePlugin = _pil()
    path = Path(path)
    arr = np.asarray(img01)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"img01: expected a non-empty 2-D [H, W] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"img01: expected a float array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"img01: contains NaN or inf ({path})")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"img01: values {lo:.4g}..{hi:.4g} are outside [0, 1] ({path})")
    q = np.round(np.clip(arr, 0.0, 1.0) * 65535.0).astype("<u2")  # [H, W] uint16 little-endian
    info = PngImagePlugin.PngInfo()
    for key, value in _check_text(text).items():
        try:
            value.encode("latin-1")
            info.add_text(key, value)                      # tEXt
        except UnicodeEncodeError:
            info.add_itxt(key, value)                      # iTXt: UTF-8
    im = Image.frombuffer("I;16", (q.shape[1], q.shape[0]), q.tobytes(), "raw", "I;16", 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            im.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)                                  # a crash never leaves a half PNG under `path`
    finally:
        if tmp.exists():
            tmp.unlink()


def read_png_text(path: str | Path) -> dict[str, str]:
    """The PNG's tEXt/iTXt/zTXt chunks as {key: value} ({} when there are none)."""
    Image, _ = _pil()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"not a PNG (format {im.format})")
            im.load()                                      # chunks after IDAT are read by load()
            return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read PNG text: {e}") from e
    except ValueError as e:
        raise ValueError(f"{path}: cannot read PNG text: {e}") from e
