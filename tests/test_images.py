"""Tests for convmaps.io.images: finding inputs, hashing, and decoding every kind of file to RGB."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from convmaps.errors import BadImageError, ConvmapsError
from convmaps.io.images import (
    BACKGROUND,
    IMAGE_SUFFIXES,
    ImageSource,
    decode,
    find_images,
    sha256_file,
)

from .conftest import no_hang

# --- helpers -----------------------------------------------------------------------------


def _touch_image(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so the header can say anything (16-bit colour, huge sizes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _keys(sources: list[ImageSource]) -> list[str]:
    return [s.key for s in sources]


def _bad_reason(path: Path, **kwargs: int) -> str:
    with pytest.raises(BadImageError) as info:
        decode(path, **kwargs)
    return str(info.value)


# --- find_images -------------------------------------------------------------------------


def test_suffixes_cover_the_listed_formats() -> None:
    for ext in ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm"):
        assert f".{ext}" in IMAGE_SUFFIXES


def test_nested_folders_are_sorted_by_key(tmp_path: Path) -> None:
    for rel in ("c.png", "b/z.png", "a/y.png", "a/sub/x.png", "a.png"):
        _touch_image(tmp_path / rel)
    sources = find_images([tmp_path])
    assert _keys(sources) == ["a.png", "a/sub/x.png", "a/y.png", "b/z.png", "c.png"]
    assert all(s.root == tmp_path for s in sources)
    assert sources[1].path == tmp_path / "a" / "sub" / "x.png"


def test_same_name_in_two_subfolders_gets_two_keys(tmp_path: Path) -> None:
    _touch_image(tmp_path / "a" / "cat.jpg")
    _touch_image(tmp_path / "b" / "cat.jpg")
    assert _keys(find_images([tmp_path])) == ["a/cat.jpg", "b/cat.jpg"]


def test_non_images_in_folders_are_ignored_and_suffix_case_is_ignored(tmp_path: Path) -> None:
    _touch_image(tmp_path / "one.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "TWO.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "png").mkdir()  # a folder named like an extension holds nothing
    assert _keys(find_images([tmp_path])) == ["TWO.JPG", "one.png"]


def test_explicit_file_is_taken_whatever_its_extension(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert find_images([notes]) == [ImageSource(path=notes, root=tmp_path, key="notes.txt")]


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch_image(root / "a" / "x.png")
    (root / "a" / "loop").symlink_to(root)  # a/loop -> its own grandparent
    (root / "a" / "self").symlink_to(root / "a")
    assert _keys(find_images([root])) == ["a/x.png"]


def _file_loop(folder: Path) -> tuple[Path, Path]:
    """`ln -s a.png b.png; ln -s b.png a.png` inside `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / "a.png", folder / "b.png"
    b.symlink_to("a.png")
    a.symlink_to("b.png")
    return a, b


def test_file_symlink_loop_is_found_and_reported_as_a_reason(tmp_path: Path) -> None:
    a, b = _file_loop(tmp_path / "in")
    _touch_image(tmp_path / "in" / "c.png")
    for inputs, keys in [([tmp_path / "in"], ["a.png", "b.png", "c.png"]), ([a], ["a.png"])]:
        assert _keys(find_images(inputs)) == keys
    for link in (a, b):
        assert _bad_reason(link) == "unreadable: symlink loop"
        with pytest.raises(BadImageError, match="^unreadable: symlink loop$"):
            sha256_file(link)


def test_real_tree_wins_over_a_symlinked_alias(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch_image(root / "real" / "x.png")
    (root / "alias").symlink_to(root / "real")  # sorts before "real", still loses
    assert _keys(find_images([root])) == ["real/x.png"]


def test_symlink_to_folder_outside_is_followed(tmp_path: Path) -> None:
    _touch_image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "more").symlink_to(tmp_path / "elsewhere")
    sources = find_images([tmp_path / "in"])
    assert _keys(sources) == ["more/x.png"]
    assert sources[0].path == tmp_path / "in" / "more" / "x.png"


def test_same_file_twice_appears_once(tmp_path: Path) -> None:
    cat = _touch_image(tmp_path / "cat.png")
    assert _keys(find_images([cat, cat, tmp_path, Path(str(tmp_path) + "/./cat.png")])) == [
        "cat.png"
    ]


def test_missing_input_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ConvmapsError, match="nope.png"):
        find_images([missing])


def test_dangling_symlink_named_directly_is_kept_for_decode_to_report(tmp_path: Path) -> None:
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "never-existed.png")
    assert _keys(find_images([link])) == ["gone.png"]


def test_empty_folder_gives_empty_list(tmp_path: Path) -> None:
    assert find_images([tmp_path]) == []
    assert find_images([]) == []


def test_colliding_keys_across_roots_are_prefixed_then_numbered(tmp_path: Path) -> None:
    _touch_image(tmp_path / "one" / "cat.png", (1, 1, 1))
    _touch_image(tmp_path / "two" / "cat.png", (2, 2, 2))
    _touch_image(tmp_path / "x" / "two" / "cat.png", (3, 3, 3))
    _touch_image(tmp_path / "y" / "Cat.png", (4, 4, 4))  # differs only in case
    inputs = [tmp_path / "one", tmp_path / "two", tmp_path / "x" / "two", tmp_path / "y"]
    sources = find_images(inputs)
    assert _keys(sources) == ["cat.png", "two/cat.png", "two~2/cat.png", "y/Cat.png"]
    assert [s.root for s in sources] == inputs
    assert find_images(inputs) == sources  # deterministic


def test_inputs_keep_their_given_order(tmp_path: Path) -> None:
    b = _touch_image(tmp_path / "b.png")
    a = _touch_image(tmp_path / "a.png")
    assert _keys(find_images([b, a])) == ["b.png", "a.png"]


# --- sha256_file -------------------------------------------------------------------------


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)  # spans several chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_sha256_of_unreadable_file_is_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="unreadable"):
        sha256_file(tmp_path)


# --- decode: conversions -----------------------------------------------------------------


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 10, 20))  # blue left strip
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = decode(path)
    assert decoded.size == (20, 40)
    top = _rgb(decoded)[2, 10]  # the left strip is now at the top
    assert top[2] > 150 and top[0] < 60


def test_plain_rgb_is_unchanged(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(_rgb(decode(path)), pixels)


def test_grey_l_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "l.png"
    Image.new("L", (3, 2), 77).save(path)
    assert _rgb(decode(path)).tolist() == [[[77, 77, 77]] * 3] * 2


def test_one_bit_becomes_black_and_white(tmp_path: Path) -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    path = tmp_path / "bits.pbm"
    image.save(path)
    assert _rgb(decode(path)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_palette_with_transparency_is_composited(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    assert _rgb(decode(path)).tolist() == [[list(BACKGROUND), [255, 0, 0]]]


def test_grey_with_alpha_is_composited(tmp_path: Path) -> None:
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (100, 255))
    path = tmp_path / "la.png"
    image.save(path)
    assert _rgb(decode(path)).tolist() == [[list(BACKGROUND), [100, 100, 100]]]


def test_rgba_is_composited_on_background(tmp_path: Path) -> None:
    image = Image.new("RGBA", (3, 1), (10, 20, 30, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "rgba.png"
    image.save(path)
    pixels = _rgb(decode(path))
    assert pixels[0, 0].tolist() == list(BACKGROUND)
    assert pixels[0, 1].tolist() == [10, 20, 30]
    assert abs(int(pixels[0, 2, 0]) - 127) <= 1  # half black over white


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(path)
    assert Image.open(path).mode == "CMYK"
    assert _rgb(decode(path))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])  # Pillow cannot save HSV
def test_other_colour_spaces_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.tif"
    original = Image.new("RGB", (2, 2), (200, 10, 30))
    try:
        original.convert(mode).save(path)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow cannot write {mode} TIFF")
    got = _rgb(decode(path))[0, 0].astype(int)
    assert np.abs(got - [200, 10, 30]).max() <= 4


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", "<u2"), (".tif", "<u2"), (".tif", ">u2")])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path, suffix: str, dtype: str) -> None:
    ramp = np.linspace(0, 65535, 1001).round().astype(dtype).reshape(1, -1)
    ramp[0, 500] = 32768
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    grey = _rgb(decode(path))[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255
    assert grey[500] == 128
    assert grey[250] == 64 and grey[750] == 191  # scaled, not clipped at 255
    assert np.all(np.diff(grey.astype(int)) >= 0)
    np.testing.assert_array_equal(grey, np.rint(ramp[0].astype(float) / 257))


def test_16_bit_dark_image_stays_dark(tmp_path: Path) -> None:
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((2, 2), 200, dtype=np.uint16)).save(path)  # 200/65535 is ~black
    assert _rgb(decode(path)).max() == 1


def test_32_bit_int_grey_is_16_bit_when_above_255_else_8_bit(tmp_path: Path) -> None:
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 32768, 65535, 70000]], dtype=np.int32)).save(wide)
    assert Image.open(wide).mode == "I"
    assert _rgb(decode(wide))[0, :, 0].tolist() == [0, 128, 255, 255]
    narrow = tmp_path / "narrow.tif"
    Image.fromarray(np.array([[0, 100, 255, -5]], dtype=np.int32)).save(narrow)
    assert _rgb(decode(narrow))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_float_grey_unit_range_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "unit.tif"
    values = np.array([[0.0, 0.5, 1.0, np.nan, -0.5]], dtype=np.float32)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    assert _rgb(decode(path))[0, :, 0].tolist() == [0, 128, 255, 0, 0]


def test_float_grey_byte_range_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "bytes.tif"
    Image.fromarray(np.array([[0.0, 12.4, 254.6, 300.0]], dtype=np.float32)).save(path)
    assert _rgb(decode(path))[0, :, 0].tolist() == [0, 12, 255, 255]


def test_16_bit_colour_png_arrives_as_8_bit(tmp_path: Path) -> None:
    samples = np.array([[[0, 32768, 65535], [257, 40000, 65280]]], dtype=">u2")
    rows = b"\x00" + samples[0].tobytes()
    path = tmp_path / "deep.png"
    path.write_bytes(_raw_png(2, 1, 16, 2, rows))
    got = _rgb(decode(path)).astype(int)
    assert got[0, 0].tolist() == [0, 128, 255]
    assert np.abs(got - np.rint(samples.astype(float) / 257)).max() <= 1


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".ppm", ".webp"])
def test_common_formats_decode(tmp_path: Path, suffix: str) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"x{suffix}"
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    Image.new("RGB", (6, 4), (90, 160, 30)).save(path, **kwargs)
    decoded = decode(path)
    assert decoded.size == (6, 4)
    assert _rgb(decoded)[1, 1].tolist() == [90, 160, 30]


def test_animated_gif_gives_frame_0(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (5, 5), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    assert _rgb(decode(path))[2, 2].tolist() == [255, 0, 0]


def test_multipage_tiff_gives_page_0(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (5, 5), (0, 0, 255)), Image.new("RGB", (7, 3), (255, 0, 0))]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 2
    decoded = decode(path)
    assert decoded.size == (5, 5)
    assert _rgb(decoded)[0, 0].tolist() == [0, 0, 255]


def test_decoded_image_does_not_need_the_file(tmp_path: Path) -> None:
    path = _touch_image(tmp_path / "x.png", (5, 6, 7))
    decoded = decode(path)
    path.unlink()
    assert decoded.getpixel((0, 0)) == (5, 6, 7)


# --- decode: broken inputs ---------------------------------------------------------------


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _bad_reason(path) == "empty file"


def test_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a picture\n")
    assert _bad_reason(path) == "not an image (cannot identify format)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full"
    Image.fromarray(noise).save(full, format=fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert _bad_reason(path).startswith("truncated or corrupt: ")


def test_corrupt_png_checksum(tmp_path: Path) -> None:
    data = bytearray(_raw_png(4, 4, 8, 0, b"\x00\x10\x20\x30\x40" * 4))
    data[-20] ^= 0xFF  # inside IDAT: its CRC no longer matches
    path = tmp_path / "crc.png"
    path.write_bytes(bytes(data))
    assert _bad_reason(path).startswith("truncated or corrupt: ")


def test_size_over_max_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _touch_image(tmp_path / "x.png")  # 4 x 4
    assert _bad_reason(path, max_pixels=15) == "too large: 4 x 4 pixels > limit of 15"
    assert decode(path, max_pixels=16).size == (4, 4)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"  # a few dozen bytes claiming 10^8 pixels
    path.write_bytes(_raw_png(10_000, 10_000, 8, 2, b""))
    assert _bad_reason(path) == "too large: 10000 x 10000 pixels > limit of 64,000,000"


def test_decompression_bomb_over_pillows_hard_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"  # 10^10 pixels: Pillow itself refuses it inside Image.open
    path.write_bytes(_raw_png(100_000, 100_000, 8, 2, b""))
    reason = _bad_reason(path)
    assert reason.startswith("too large: ") and "10000000000 pixels" in reason


@pytest.mark.parametrize("side", [10_000, 100_000])  # Pillow's warning, then its error
def test_pillow_bomb_limit_still_applies_when_max_pixels_is_raised(
    tmp_path: Path, side: int
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_raw_png(side, side, 8, 2, b""))
    assert _bad_reason(path, max_pixels=10**12).startswith("too large: ")


def test_directory_passed_as_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert _bad_reason(folder) == "unreadable: is a directory"


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "never-existed.png")
    assert _bad_reason(link).startswith("unreadable: ")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert _bad_reason(fifo) == "unreadable: not a regular file"


def test_permission_denied(tmp_path: Path) -> None:
    path = _touch_image(tmp_path / "secret.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        assert _bad_reason(path).startswith("unreadable: ")
    finally:
        path.chmod(0o644)


def test_os_errors_while_reading_are_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _touch_image(tmp_path / "x.png")

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refuse)
    assert _bad_reason(path) == "unreadable: Permission denied"


def _sample_files(tmp_path: Path) -> list[bytes]:
    noise = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    blobs = []
    for fmt in ("PNG", "JPEG", "GIF", "TIFF", "BMP", "PPM") + (
        ("WEBP",) if features.check("webp") else ()
    ):
        path = tmp_path / f"sample.{fmt.lower()}"
        image.save(path, format=fmt)
        blobs.append(path.read_bytes())
    return blobs


def test_mangled_files_only_ever_raise_bad_image_error(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "mangled.img"
    for blob in _sample_files(tmp_path):
        for _ in range(40):
            data = bytearray(blob)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data[: rng.randint(1, len(data))]))
            with contextlib.suppress(BadImageError):
                assert decode(path).mode == "RGB"


def test_sha256_of_a_fifo_is_a_reason_not_a_hang(tmp_path: Path, fifo) -> None:
    path = fifo(tmp_path / "cat.png")
    with pytest.raises(BadImageError, match="unreadable: not a regular file but a named pipe"):
        no_hang(sha256_file, path)


def test_decode_and_hash_read_the_file_once_and_agree_with_each_reader(tmp_path, opened):
    from convmaps.io.images import decode_and_hash

    path = tmp_path / "x.png"
    Image.new("RGB", (7, 5), (10, 20, 30)).save(path)
    opened.clear()
    image, sha = decode_and_hash(path)
    assert opened.count(str(path)) == 1  # one read for both
    assert sha == sha256_file(path)
    assert np.array_equal(np.asarray(image), np.asarray(decode(path)))
