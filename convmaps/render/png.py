"""PNG encoding: pictures to deterministic PNG bytes, with their `convmaps-*` text chunks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin

__all__ = ["png_bytes"]


def png_bytes(img: Image.Image, compress_level: int = 1, note: str | None = None) -> bytes:
    """Encode `img` as PNG, with its `convmaps-*` info (value range, scale) and `note` as text.

    Grids are palette images already (a byte per pixel, no adaptive row filters); an RGB
    image of at most 256 colours is stored as one too, losslessly; any other is stored by
    Pillow as it is. Palette images are deflated by ISA-L (`isal`) rather than zlib: on
    AlexNet's 64x55x55 grid, ISA-L's level 1 took 0.6 ms for 137 KB where zlib's took 3.9 ms
    for 145 KB (zlib level 0: 0.1 ms for 264 KB), and zlib was most of a dump's PNG cost
    (`benchmarks/bench_png.py`). The chunks are in a fixed order and carry no timestamp, so
    the same image gives the same bytes.

    >>> from PIL import Image as I
    >>> import io
    >>> I.open(io.BytesIO(png_bytes(I.new("RGB", (2, 2)), note="hi"))).info["convmaps-note"]
    'hi'
    """
    text: dict[str, str] = {
        k: str(v) for k, v in img.info.items() if isinstance(k, str) and k.startswith("convmaps-")
    }
    if note is not None:
        text["convmaps-note"] = note
    img = _lossless_palette(img)
    if img.mode == "P" and img.width * img.height:
        rows = np.zeros((img.height, img.width + 1), dtype=np.uint8)  # filter byte 0: none
        rows[:, 1:] = np.asarray(img, dtype=np.uint8)
        palette = np.frombuffer(bytes(img.getpalette() or [0, 0, 0]), np.uint8)
        return _palette_png(rows, palette, dict(sorted(text.items())), compress_level)
    info = PngImagePlugin.PngInfo()
    for key in sorted(text):  # a fixed chunk order keeps the bytes deterministic
        info.add_text(key, text[key])  # Pillow falls back to iTXt for non-Latin-1 text
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level, pnginfo=info)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _text_chunk(key: str, value: str) -> bytes:
    try:  # tEXt is Latin-1; anything else goes in an uncompressed iTXt, as Pillow does
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode())


def _palette_png(rows: np.ndarray, palette: np.ndarray, text: dict[str, str], level: int
                 ) -> bytes:
    """A palette picture as PNG: IHDR, PLTE, text chunks, one IDAT of its rows (each led by
    its filter byte) deflated by ISA-L, IEND (the format's own layout; Pillow reads every
    file back in the tests). `palette` holds the RGB triples."""
    from isal import isal_zlib

    height, width = rows.shape[0], rows.shape[1] - 1
    head = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", head), _chunk(b"PLTE", palette.tobytes())]
    parts += [_text_chunk(k, v) for k, v in text.items()]
    level = min(max(level, 0), isal_zlib.ISAL_BEST_COMPRESSION)  # ISA-L has levels 0-3
    deflated = isal_zlib.compress(np.ascontiguousarray(rows).data, level)
    parts += [_chunk(b"IDAT", deflated), _chunk(b"IEND", b"")]
    return b"".join(parts)


def _lossless_palette(img: Image.Image) -> Image.Image:
    """An RGB image of at most 256 colours as the same pixels in a palette image (a byte per
    pixel instead of three); any other image as it is. Exact: each pixel keeps its colour."""
    if img.mode != "RGB" or img.getcolors(256) is None:
        return img
    rgb = np.asarray(img, dtype=np.uint32)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table, inverse = np.unique(keys, return_inverse=True)
    indexed = Image.fromarray(inverse.reshape(keys.shape).astype(np.uint8), "L")
    palette = np.stack([table >> 16, (table >> 8) & 255, table & 255], axis=1).astype(np.uint8)
    indexed.putpalette(palette.tobytes())
    return indexed
