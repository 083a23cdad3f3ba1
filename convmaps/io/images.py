"""Images: find them under the INPUT paths, hash them, and decode each to an 8-bit RGB picture.

Every input becomes an `ImageSource` whose `key` names its output folder, and every file either
decodes to a plain RGB `PIL.Image.Image` or raises `BadImageError` with a short reason the
manifest can record. Preprocessing (resize, normalise, tensors) is the caller's business.

    >>> import tempfile
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "a").mkdir()
    >>> Image.new("LA", (4, 3), (0, 0)).save(folder / "a" / "cat.png")
    >>> [s.key for s in find_images([folder])]
    ['a/cat.png']
    >>> image = decode(folder / "a" / "cat.png")
    >>> image.mode, image.size, image.getpixel((0, 0)) == BACKGROUND
    ('RGB', (4, 3), True)
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import unicodedata
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convmaps.errors import BadImageError, ConvmapsError

__all__ = [
    "BACKGROUND",
    "IMAGE_SUFFIXES",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "ImageSource",
    "decode",
    "decode_and_hash",
    "find_images",
    "sha256_file",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
"""File extensions (lower case, with the dot) taken as images inside folders; compared
case-insensitively. A file named explicitly as an INPUT is taken whatever its extension."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Transparent pixels are composited onto this fixed colour (white), so that the same file
always gives the same RGB values whatever viewer or library made it."""

MAX_PIXELS = 64_000_000
"""Default limit on width x height, checked from the header before any pixel is decoded."""
MAX_FILE_BYTES = 1 << 30
"""Largest image file decoded: it is read whole, to be hashed and decoded from one read."""


@dataclass(frozen=True)
class ImageSource:
    """One image to process.

    `path` is the file as reached from its INPUT (not resolved), `root` the INPUT folder it was
    found under (for a file given directly: its parent), and `key` the unique, '/'-separated
    name of its output folder: the path relative to `root`, extension kept.
    """

    path: Path
    root: Path
    key: str


# --- finding -----------------------------------------------------------------------------


def find_images(inputs: Sequence[str | Path]) -> list[ImageSource]:
    """All images under `inputs` (files and folders), in a deterministic order.

    Rules:
      * inputs are taken in the order given; a folder's images are sorted by key;
      * in folders only names ending in `IMAGE_SUFFIXES` count, a file named directly always
        counts (a broken one is then reported by `decode`); a dangling symlink named directly
        counts as a file, so it is recorded as unreadable rather than missing;
      * symlinks are followed, to files and to folders, also out of the INPUT folder; each real
        folder is walked once (the real tree under an INPUT wins over symlinked aliases of
        it), so symlink loops terminate;
      * a file symlink that loops (`ln -s a b; ln -s b a`) counts like a dangling one: `decode`
        and `sha256_file` report it as "unreadable: symlink loop";
      * one real file appears once, under the first key that reaches it (compared by
        `os.path.realpath`, which, unlike `Path.resolve` before Python 3.13, never raises on a
        symlink loop);
      * keys are unique, compared case- and normalisation-insensitively (so outputs cannot
        clash on macOS or Windows either): a key already taken becomes
        `<root folder name>/<key>`, and if that is taken too `<root folder name>~2/<key>`,
        `~3`, ... .

    Raises:
        ConvmapsError: an INPUT that does not exist, or a folder that cannot be listed.
    """
    sources: list[ImageSource] = []
    taken_keys: set[str] = set()
    seen_files: set[str] = set()
    for item in inputs:
        for root, path, key in _expand(Path(item)):
            real = os.path.realpath(path)
            if real in seen_files:
                continue
            seen_files.add(real)
            unique = _unique_key(key, root, taken_keys)
            taken_keys.add(_folded(unique))
            sources.append(ImageSource(path=path, root=root, key=unique))
    return sources


def _expand(item: Path) -> list[tuple[Path, Path, str]]:
    """(root, path, key) for one INPUT: a folder's images sorted by key, or the file itself."""
    # lexists, not exists: a dangling symlink is there, just unreadable (decode says so).
    if not os.path.lexists(item):
        raise ConvmapsError(f"input not found: {item}")
    if item.is_dir():
        found = [(item, path, key) for path, key in _walk(item)]
        return sorted(found, key=lambda entry: entry[2])
    return [(item.parent, item, item.name)]


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, key) of every image file under `root`, following symlinks without looping.

    Real sub-folders are queued ahead of symlinked ones, so the real tree is walked first and
    a symlink to a folder already walked (an ancestor, or an alias) is skipped.
    """
    real_queue: deque[tuple[Path, str]] = deque([(root, "")])
    link_queue: deque[tuple[Path, str]] = deque()
    visited: set[str] = set()
    while real_queue or link_queue:
        folder, prefix = real_queue.popleft() if real_queue else link_queue.popleft()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        for entry in _list_folder(folder):
            key = prefix + entry.name
            if _is_dir(entry):
                queue = link_queue if entry.is_symlink() else real_queue
                queue.append((Path(entry.path), key + "/"))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(entry.path), key


def _list_folder(folder: Path) -> list[os.DirEntry[str]]:
    """A folder's entries sorted by name; an unreadable folder is an error, not a silent gap."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as e:
        raise ConvmapsError(f"cannot read folder {folder}: {e.strerror or e}") from e


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _unique_key(key: str, root: Path, taken: set[str]) -> str:
    """`key`, or `key` under its root folder's name (then `name~2`, `name~3`...) if taken
    (compared as `_folded`)."""
    if _folded(key) not in taken:
        return key
    name = Path(os.path.abspath(root)).name or "root"
    candidate, n = f"{name}/{key}", 2
    while _folded(candidate) in taken:
        candidate, n = f"{name}~{n}/{key}", n + 1
    return candidate


def _folded(key: str) -> str:
    """What a case-insensitive, normalisation-insensitive file system (macOS, Windows) sees
    of a key: `café` in NFC and NFD are one folder there, as `Case` and `case` are."""
    return unicodedata.normalize("NFC", key).casefold()


# --- hashing -----------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed by `hashlib.file_digest` (never all in memory).

    Raises:
        BadImageError: the file cannot be read or is no regular file.
    """
    from convmaps.io.store import open_regular

    try:
        with open_regular(path) as f:  # a FIFO in its place would block forever
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise BadImageError(_unreadable(e)) from e


def _unreadable(e: OSError) -> str:
    """The reason an OS error gives for a file that cannot be read."""
    if e.errno == errno.ELOOP:  # `ln -s a b; ln -s b a`: no file at the end of the links
        return "unreadable: symlink loop"
    return f"unreadable: {e.strerror or e}"


# --- decoding ----------------------------------------------------------------------------


def decode(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode the first frame of an image file to an 8-bit RGB image, orientation applied.

    Conversions: EXIF orientation applied; first frame/page only; 1/L/CMYK/YCbCr/HSV/LAB
    converted by Pillow; P/PA/LA/RGBA (any transparency) composited onto `BACKGROUND`;
    16-bit and 32-bit integer grey scaled by `x / 257` (rounded), 32-bit integer grey with no
    value above 255 taken as 8-bit; float grey taken as [0, 1] when its largest finite value
    is <= 1, else as [0, 255]; out-of-range values (and anything above 16 bits) are clipped,
    NaN becomes 0. 16-bit colour PNGs arrive already 8-bit: Pillow keeps each sample's high
    byte (x >> 8), which differs from x / 257 by at most 1.

    Raises:
        BadImageError: empty, unreadable, not an image, truncated or corrupt, or larger than
            `max_pixels` (or than Pillow's own `Image.MAX_IMAGE_PIXELS`, whichever is lower).
    """
    path = Path(path)
    _check_regular_file(path)
    return _rgb(_read_first_frame(path, max_pixels))


def decode_and_hash(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """`decode` and `sha256_file` from one read of the file: the sha256 names the very bytes
    that were decoded, and a folder of images is read once, not twice.

    Raises:
        BadImageError: as `decode`, or a file over `MAX_FILE_BYTES`.
    """
    from convmaps.io.store import open_regular

    path = Path(path)
    _check_regular_file(path)
    try:
        with open_regular(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise BadImageError(_unreadable(e)) from e
    if len(data) > MAX_FILE_BYTES:
        raise BadImageError(f"too large: over {MAX_FILE_BYTES >> 20} MiB")
    return _rgb(_read_first_frame(io.BytesIO(data), max_pixels)), \
        hashlib.sha256(data).hexdigest()


def _rgb(image: Image.Image) -> Image.Image:
    try:
        return _to_rgb(image)
    except (ValueError, OSError) as e:  # Pillow: "conversion from X to Y not supported"
        raise BadImageError(f"unsupported pixel mode {image.mode}: {e}") from e


def _check_regular_file(path: Path) -> None:
    """Reject what Pillow would misreport or block on: missing, folders, FIFOs, empty files."""
    try:
        info = path.stat()
    except OSError as e:
        raise BadImageError(_unreadable(e)) from e
    if stat.S_ISDIR(info.st_mode):
        raise BadImageError("unreadable: is a directory")
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would hang
        raise BadImageError("unreadable: not a regular file")
    if info.st_size == 0:
        raise BadImageError("empty file")


def _read_first_frame(path: Path | io.BytesIO, max_pixels: int) -> Image.Image:
    """Open, size-check, fully load and orient frame 0; the result no longer needs the file."""
    try:
        # Pillow warns about pixel counts over Image.MAX_IMAGE_PIXELS from inside Image.open;
        # _check_size rejects all of those itself (its limit is never above Pillow's), with a
        # clearer message, so the warning is silenced rather than printed. Pillow's UserWarnings
        # about damaged metadata are silenced too: the file either decodes or gets a reason.
        # (catch_warnings is process-global before Python 3.14: decode in processes, not threads.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as image:  # positioned at frame/page 0; we never seek
                _check_size(image.size, max_pixels)
                image.load()  # decode now, so truncation raises here and not later
                # exif_transpose returns a detached copy even when there is nothing to rotate.
                return ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: raised in open
        raise BadImageError(f"too large: {e}") from e
    except UnidentifiedImageError as e:  # an OSError, so before the OSError branch
        raise BadImageError("not an image (cannot identify format)") from e
    except OSError as e:
        if e.errno is not None:  # the OS failed (permissions, I/O); Pillow's errors have none
            raise BadImageError(_unreadable(e)) from e
        raise BadImageError(f"truncated or corrupt: {e}") from e
    except Exception as e:
        # Pillow's plugins raise all sorts (SyntaxError, ValueError, struct.error, EOFError...)
        # on hostile bytes; for an input file every one of them means "corrupt".
        raise BadImageError(f"truncated or corrupt: {type(e).__name__}: {e}") from e


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise BadImageError(f"too large: {width} x {height} pixels > limit of {limit:,}")
    if width * height == 0:
        raise BadImageError(f"empty image: {width} x {height} pixels")


_PILLOW_TO_RGB = frozenset({"1", "L", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"})
_WITH_ALPHA = frozenset({"P", "PA", "LA", "RGBA", "RGBa"})


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, by the rules in `decode`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _PILLOW_TO_RGB:
        return image.convert("RGB")
    if mode == "La":  # premultiplied; Pillow converts it to LA only
        image, mode = image.convert("LA"), "LA"
    if mode in _WITH_ALPHA:
        # P goes through RGBA even without transparency: one path for every palette image.
        return _composite(image.convert("RGBA"))
    if mode.startswith("I;16"):
        return _grey_to_rgb(_uint16_to_uint8(np.asarray(image)))
    if mode == "I":
        return _grey_to_rgb(_int32_to_uint8(np.asarray(image)))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(image)))
    raise BadImageError(f"unsupported pixel mode {mode}")


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit grey -> uint8 over the type's full range: x / 257, rounded (never clipped)."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    # Integer round-to-nearest of x * 255 / 65535; no ties exist because 65535 is odd.
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _int32_to_uint8(values: np.ndarray) -> np.ndarray:
    """Mode I grey -> uint8: as 8-bit if every value fits, else as 16-bit (above clipped).

    Pillow gives mode I for several 16- and 32-bit formats; data above 255 is almost always
    16-bit samples, while 0..255 in mode I is 8-bit data widened by some converter.
    """
    if values.max(initial=0) <= 255:
        return np.clip(values, 0, 255).astype(np.uint8)
    return _uint16_to_uint8(values)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float grey -> uint8: [0, 1] if the largest finite value is <= 1, else [0, 255]."""
    values = np.where(np.isnan(values), 0.0, values.astype(np.float64))
    finite = values[np.isfinite(values)]
    scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")
