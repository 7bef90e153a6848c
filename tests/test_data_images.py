"""Image IO: exact 16-bit round trip, 8-bit/JPEG/colour reads, PNG text chunks, bad input."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megamed.data.images import read_image, read_png_text, write_png16


def _png_chunks(path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, parsed by hand: an independent check of what PIL wrote."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(ctype + body) & 0xFFFFFFFF
        out.append((ctype, body))
        pos += 12 + length
    return out


def test_png16_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)   # awkward, non-square size
    q[0, 0], q[-1, -1] = 0, 65535
    path = tmp_path / "a.png"
    write_png16(path, q.astype(np.float64) / 65535.0)
    ihdr = dict(_png_chunks(path))[b"IHDR"]
    width, height, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    assert (width, height, depth, colour) == (53, 37, 16, 0)       # 16-bit grayscale
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im).astype(np.uint16), q)
    img = read_image(path)
    assert img.dtype == np.float32 and img.shape == (37, 53)
    assert np.array_equal(np.round(img.astype(np.float64) * 65535).astype(np.uint16), q)
    # float32 -> PNG -> float32 is a fixed point
    write_png16(tmp_path / "b.png", img)
    assert np.array_equal(read_image(tmp_path / "b.png"), img)


def test_png16_quantises_by_rounding(tmp_path):
    x = np.array([[0.0, 0.5, 1.0, 1 / 65535 * 0.49, 1 / 65535 * 0.51]])
    write_png16(tmp_path / "r.png", x)
    with Image.open(tmp_path / "r.png") as im:
        assert np.asarray(im).astype(int).tolist() == [[0, 32768, 65535, 0, 1]]


def test_read_8bit_png_and_colour(tmp_path):
    g = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    assert np.array_equal(read_image(tmp_path / "g.png"), g.astype(np.float32) / 255)
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255               # ITU-R 601
    got = read_image(tmp_path / "c.png")
    assert got.shape == (5, 7)
    assert np.allclose(got, luma, atol=1 / 255)


def test_read_jpeg_gray_and_rgb(tmp_path):
    yy, xx = np.mgrid[0:40, 0:30]
    g = (yy * 4 + xx * 2).astype(np.uint8)                               # smooth: JPEG keeps it closely
    Image.fromarray(g, mode="L").save(tmp_path / "g.jpg", quality=100)
    got = read_image(tmp_path / "g.jpg")
    assert got.dtype == np.float32 and got.shape == (40, 30)
    assert np.abs(got * 255 - g).max() <= 3
    Image.fromarray(np.stack([g] * 3, -1), mode="RGB").save(tmp_path / "c.jpeg", quality=100)
    got = read_image(tmp_path / "c.jpeg")
    assert got.shape == (40, 30) and np.abs(got * 255 - g).max() <= 3


def test_text_chunks_round_trip(tmp_path):
    text = {"synthetic": "true", "prompt": "Chest X-ray showing small left pleural effusion",
            "negative_prompt": "", "seed": "42", "sampler": "dpmpp_2m", "steps": "30", "guidance": "4.5",
            "model_hash": "ab" * 32, "megamed_version": "0.1.0", "note": "Ünïcödé ∑ → stays UTF-8"}
    path = tmp_path / "t.png"
    write_png16(path, np.full((3, 4), 0.25), text)
    assert read_png_text(path) == text
    types = [c for c, _ in _png_chunks(path)]
    assert b"tEXt" in types and b"iTXt" in types                          # Latin-1 -> tEXt, other -> iTXt
    write_png16(tmp_path / "n.png", np.zeros((2, 2)))
    assert read_png_text(tmp_path / "n.png") == {}


def test_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "x.png"
    write_png16(path, np.zeros((4, 4)), {"v": "1"})
    write_png16(path, np.ones((4, 4)), {"v": "2"})
    assert read_png_text(path) == {"v": "2"} and read_image(path).min() == 1.0
    with pytest.raises(ValueError):
        write_png16(path, np.full((4, 4), np.nan))
    assert read_png_text(path) == {"v": "2"}                               # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]      # no temp files left


def test_range_tolerance_and_bad_arrays(tmp_path):
    p = tmp_path / "x.png"
    write_png16(p, np.array([[-1e-4, 1 + 1e-4]]))                           # sampler round-off: clipped
    assert read_image(p).tolist() == [[0.0, 1.0]]
    for bad, match in [(np.zeros((2, 2, 3)), "2-D"), (np.zeros((0, 4)), "2-D"), (np.zeros(5), "2-D"),
                       (np.array([[0.0, 1.5]]), "outside"), (np.array([[-0.5, 0.0]]), "outside"),
                       (np.array([[np.inf]]), "NaN or inf"), (np.array([["a"]]), "dtype")]:
        with pytest.raises(ValueError, match=match):
            write_png16(p, bad)
    for text, match in [({"": "x"}, "keyword"), ({"k" * 80: "x"}, "keyword"), ({"seed": 3}, "str"),
                        ({"∑": "x"}, "Latin-1"), (["a"], "dict")]:
        with pytest.raises(ValueError, match=match):
            write_png16(p, np.zeros((2, 2)), text)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    trunc = tmp_path / "trunc.png"
    write_png16(trunc, np.random.default_rng(1).random((64, 64)))
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(ValueError, match="trunc.png"):
        read_image(trunc)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "j.jpg")
    with pytest.raises(ValueError, match="j.jpg.*not a PNG"):
        read_png_text(tmp_path / "j.jpg")
