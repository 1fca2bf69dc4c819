from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgvec.errors import BadInputError, ImageSkipped
from imgvec.files.images import find_images, load_image


def _png(path: Path, colour=(255, 0, 0), size=(20, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def test_labels_come_from_first_level_subfolders(tmp_path: Path):
    _png(tmp_path / "cats" / "a.png")
    _png(tmp_path / "cats" / "deep" / "b.jpg")
    _png(tmp_path / "dogs" / "c.PNG")
    _png(tmp_path / "loose.png")
    c = find_images([tmp_path])
    assert c.root == str(tmp_path)
    assert [(f.key, f.label) for f in c.files] == [
        ("loose.png", ""), ("cats/a.png", "cats"), ("cats/deep/b.jpg", "cats"), ("dogs/c.PNG", "dogs")]


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path):
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "a" / ".hidden.png")
    _png(tmp_path / ".cache" / "y.png")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    assert [f.key for f in find_images([tmp_path]).files] == ["a/x.png"]


def test_files_and_several_folders_have_no_labels_and_a_common_root(tmp_path: Path):
    a = _png(tmp_path / "one" / "a.png")
    _png(tmp_path / "two" / "sub" / "b.png")
    c = find_images([a, tmp_path / "two"])
    assert c.root == str(tmp_path)
    assert [(f.key, f.label) for f in c.files] == [("one/a.png", ""), ("two/sub/b.png", "")]


def test_bad_sources_are_clear_errors(tmp_path: Path):
    with pytest.raises(BadInputError, match="no such file or folder"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images found"):
        find_images([tmp_path / "empty"])
    (tmp_path / "doc.pdf").write_bytes(b"%PDF")
    with pytest.raises(BadInputError, match="not an image file"):
        find_images([tmp_path / "doc.pdf"])


# mode -> (a uniform image in that mode, the RGB colour it must decode to)
_MODES = {
    "L": (lambda: Image.new("L", (30, 20), 200), (200, 200, 200)),
    "P": (lambda: _palette_image(), (10, 200, 30)),
    "RGBA": (lambda: Image.new("RGBA", (30, 20), (10, 200, 30, 255)), (10, 200, 30)),
    "CMYK": (lambda: Image.new("CMYK", (30, 20), (255, 0, 0, 0)), (0, 255, 255)),  # full cyan
    "I;16": (lambda: Image.fromarray(np.full((20, 30), 65535, np.uint16)), (255, 255, 255)),  # white, 16 bits: scaled
    "LA": (lambda: Image.new("LA", (30, 20), (90, 255)), (90, 90, 90)),
    "1": (lambda: Image.new("1", (30, 20), 1), (255, 255, 255)),
}


def _palette_image() -> Image.Image:
    im = Image.new("P", (30, 20), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return im


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str):
    make, rgb = _MODES[mode]
    im = make()
    assert im.mode == mode
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    im.save(path)
    arr = load_image(str(path), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert (np.abs(arr.astype(int) - rgb) <= 1).all(), (mode, arr[0, 0])  # the colour, everywhere


def test_exif_orientation_is_applied(tmp_path: Path):
    # A 40x20 image, left half red, saved with orientation 6 (rotate 90 CW when shown).
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    out = load_image(str(path), 40)
    # Upright, the red half is on top.
    assert out[:15, :, 0].mean() > 200 and out[25:, :, 0].mean() < 50


def test_gif_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (16, 16), c) for c in [(0, 0, 255), (255, 0, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(str(path), 16)
    assert out[..., 2].mean() > 200 and out[..., 0].mean() < 50


def test_bad_files_are_skipped_with_a_reason(tmp_path: Path):
    good = _png(tmp_path / "good.jpg")
    (tmp_path / "truncated.jpg").write_bytes(Image.new("RGB", (64, 64)).tobytes()[:10])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    jpg = tmp_path / "real.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg)
    (tmp_path / "cut.jpg").write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    for name in ["truncated.jpg", "empty.jpg", "page.jpg", "cut.jpg"]:
        with pytest.raises(ImageSkipped) as info:
            load_image(str(tmp_path / name), 32)
        assert info.value.path == str(tmp_path / name) and info.value.reason
    red = load_image(str(good), 32).astype(int)  # the good file still decodes, to its red (a JPEG: nearly exact)
    assert red.shape == (32, 32, 3) and (np.abs(red - [255, 0, 0]) <= 8).all()


def test_pixel_limit(tmp_path: Path):
    path = _png(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(ImageSkipped, match="over the limit"):
        load_image(str(path), 32, max_pixels=300 * 299)
    assert load_image(str(path), 32, max_pixels=300 * 300).shape == (32, 32, 3)


def test_missing_and_unreadable_files_are_skipped(tmp_path: Path):
    with pytest.raises(ImageSkipped, match="not found"):
        load_image(str(tmp_path / "gone.png"), 32)
    path = _png(tmp_path / "locked.png")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read anything")
        with pytest.raises(ImageSkipped, match="permission"):
            load_image(str(path), 32)
    finally:
        os.chmod(path, 0o644)


def test_unreadable_file_is_skipped_even_as_root(tmp_path: Path, monkeypatch):
    """Root reads anything, so make opening fail the way it does for other users."""
    path = _png(tmp_path / "locked.png")
    real_open = os.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)
    with pytest.raises(ImageSkipped, match="permission denied"):
        load_image(str(path), 32)


def _not_regular(folder: Path) -> dict[str, str]:
    """A FIFO, a unix socket and a link to /dev/zero, each named like an image; name -> expected reason."""
    import socket

    os.mkfifo(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zero.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    sock.close()  # the socket file stays
    return {"pipe.jpg": "a FIFO (named pipe), not a regular file", "zero.png": "a character device, not a regular file",
            "sock.png": "a socket, not a regular file"}


def test_fifo_device_and_socket_are_skipped_never_read(tmp_path: Path):
    """Opening a FIFO for reading blocks until a writer comes; /dev/zero never ends. Neither may be read."""
    for name, reason in _not_regular(tmp_path).items():
        with pytest.raises(ImageSkipped) as info:
            load_image(str(tmp_path / name), 32)
        assert info.value.reason == reason


def test_find_images_lists_non_regular_files_for_decoding_to_skip(tmp_path: Path):
    _png(tmp_path / "cats" / "a.png")
    expected = _not_regular(tmp_path / "cats")
    found = find_images([tmp_path])
    assert sorted(f.key for f in found.files) == sorted(["cats/a.png", *(f"cats/{n}" for n in expected)])
    given = find_images([tmp_path / "cats" / "pipe.jpg", tmp_path / "cats" / "zero.png"])  # named directly
    assert [os.path.basename(f.path) for f in given.files] == ["pipe.jpg", "zero.png"]


def test_eps_named_jpg_is_not_handed_to_ghostscript(tmp_path: Path):
    path = tmp_path / "evil.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageSkipped, match="not a recognised image"):
        load_image(str(path), 32)


# -- the messy-folder catalogue (README: "What imgvec does with each kind of file") ---------
def _jpeg(path: Path, mode: str = "RGB", size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 4 if mode == "CMYK" else 3), dtype=np.uint8)
    im = Image.fromarray(arr[..., :3]) if mode != "CMYK" else Image.fromarray(arr, "CMYK")
    (im.convert("L") if mode == "L" else im).save(path, "JPEG")
    return path


def test_catalogue_of_handled_files(tmp_path: Path):
    """Decoded and embedded, not skipped."""
    handled = {
        "cmyk.jpg": _jpeg(tmp_path / "cmyk.jpg", "CMYK"),
        "grey.jpg": _jpeg(tmp_path / "grey.jpg", "L"),
        "one_pixel.png": _png(tmp_path / "one_pixel.png", size=(1, 1)),
        "elongated.png": _png(tmp_path / "elongated.png", size=(10000, 2)),
    }
    p16 = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(p16)
    handled["sixteen.png"] = p16
    for name, path in handled.items():
        arr = load_image(str(path), 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name
    assert abs(int(load_image(str(p16), 8).mean()) - 30000 // 257) <= 1  # scaled, not clipped


def test_catalogue_of_skipped_files(tmp_path: Path):
    """Skipped with a reason, never raised as anything else."""
    rng = np.random.default_rng(1)
    (tmp_path / "noise.png").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    good = _png(tmp_path / "crc.png", size=(16, 16)).read_bytes()
    idat = good.index(b"IDAT")
    bad_crc = bytearray(good)
    bad_crc[idat + 6] ^= 0xFF  # corrupt the compressed data, leaving the stored CRC stale
    (tmp_path / "crc.png").write_bytes(bytes(bad_crc))
    (tmp_path / "zero.jpg").write_bytes(b"")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "broken_link.png")
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    for name in ["noise.png", "crc.png", "zero.jpg", "broken_link.png", "loop_a.png"]:
        with pytest.raises(ImageSkipped) as info:
            load_image(str(tmp_path / name), 32)
        assert info.value.reason, name


def test_symlinked_folder_loops_and_odd_names_do_not_break_the_walk(tmp_path: Path):
    root = tmp_path / "photos"
    _png(root / "cats" / "a.png")
    os.symlink(root, root / "cats" / "loop")  # a folder link back up: not followed
    long_name = "x" * 240 + ".png"
    _png(root / "cats" / long_name)
    latin1 = os.fsdecode(b"caf\xe9.png")
    _png(root / "cats" / latin1)
    keys = [f.key for f in find_images([root]).files]
    assert sorted(keys) == sorted(["cats/a.png", f"cats/{long_name}", f"cats/{latin1}"])


def test_decompression_bomb_refused_before_decoding(tmp_path: Path):
    # A PNG whose header claims 30000 x 30000 pixels but holds almost nothing.
    path = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageSkipped, match="decompression bomb"):
        load_image(str(path), 32)


# -- fuzzing: mutated bytes either decode or are skipped, nothing else ----------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _seeds() -> dict[str, bytes]:
    import io

    out = {}
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


SEEDS = _seeds()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(SEEDS)), edits=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])),
    min_size=1, max_size=6))
def test_fuzzed_images_decode_or_skip(tmp_path: Path, fmt: str, edits):
    data = bytearray(SEEDS[fmt])
    for where, value, op in edits:
        i = int(where * len(data)) if data else 0
        if op == "set" and data:
            data[i] = value
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = bytes([value]) * 16
    path = tmp_path / f"fuzz.{fmt.lower()}"
    path.write_bytes(bytes(data))
    expected = _pillow_decodes(bytes(data), 16)  # Pillow's own answer, step by step as load_image takes them
    try:
        arr = load_image(str(path), 16)
    except ImageSkipped as skipped:
        assert expected is None, f"skipped ({skipped.reason}) an image Pillow decodes"
        assert skipped.reason.startswith(("cannot decode: ", "not a recognised image", "decompression bomb")) or (
            "pixels is over the limit" in skipped.reason)
    else:
        assert expected is not None, "decoded an image Pillow refuses"
        np.testing.assert_array_equal(arr, expected)


def _pillow_decodes(data: bytes, size: int) -> np.ndarray | None:
    """What Pillow makes of ``data`` through load_image's steps (formats, draft, first frame, EXIF, RGB,
    resize), or None when any step fails: the oracle the fuzzed images are held to."""
    import io

    from PIL import ImageOps

    from imgvec.files.images import DEFAULT_MAX_PIXELS, _to_rgb, pil_formats

    try:
        with Image.open(io.BytesIO(data), formats=pil_formats()) as im:
            if im.size[0] * im.size[1] > DEFAULT_MAX_PIXELS:
                return None
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (size, size))
            im.seek(0)
            rgb = _to_rgb(ImageOps.exif_transpose(im))
            return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except Exception:
        return None


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB array: smooth colour gradients, a few hard edges and grain (so JPEG and the Laplacian
    see texture at every scale)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 160], axis=-1) + 30
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 5, x0:x0 + width // 6] = rng.integers(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# name -> (width, height, EXIF orientation or 0, mode saved): sizes below, at and well above the 224 target,
# DCT-scaled by draft (both sides >= 448) or not, portrait and landscape, turned by EXIF, grey and CMYK.
_JPEGS = {
    "photo-500x375": (500, 375, 0, "RGB"),
    "portrait-375x500": (375, 500, 0, "RGB"),
    "drafted-half-640x480": (640, 480, 0, "RGB"),
    "drafted-quarter-1200x900": (1200, 900, 0, "RGB"),
    "small-150x100": (150, 100, 0, "RGB"),
    "exif-3-600x450": (600, 450, 3, "RGB"),
    "exif-6-600x450": (600, 450, 6, "RGB"),
    "exif-8-1000x700": (1000, 700, 8, "RGB"),
    "grey-520x390": (520, 390, 0, "L"),
    "cmyk-480x360": (480, 360, 0, "CMYK"),
}


def _reference_decode(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's pixels and the statistics, straight from Pillow and numpy (float64): what load_image_stats
    must give, the pixels to the byte."""
    from PIL import ImageOps

    with Image.open(path) as im:
        width, height = im.size
        im.draft("RGB", (size, size))
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    grey = rgb.convert("L")
    factor = -(-max(grey.size) // 256)
    g = np.asarray(grey.reduce(factor) if factor > 1 else grey, dtype=np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    stats = np.array([width, height, g.mean(), g.std(), lap.var()])
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8), stats


@pytest.mark.parametrize("name", sorted(_JPEGS))
def test_jpeg_pixels_and_statistics_match_a_plain_pillow_decode(tmp_path: Path, name: str):
    """Embedded pixels are pinned to the byte (a faster decode path must not move them); the statistics agree
    with a float64 computation to float32 rounding. Width and height are the file's, before EXIF turns it."""
    from imgvec.files.images import load_image_stats

    width, height, orientation, mode = _JPEGS[name]
    photo = Image.fromarray(_photo(width, height, seed=len(name)))
    if mode == "L":
        photo = photo.convert("L")
    elif mode == "CMYK":
        photo = photo.convert("CMYK")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path = tmp_path / f"{name}.jpg"
    photo.save(path, quality=90, exif=exif)
    pixels, stats = load_image_stats(str(path), 224)
    expected_pixels, expected_stats = _reference_decode(path, 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, expected_pixels)
    assert stats is not None and stats.dtype == np.float32
    np.testing.assert_allclose(stats, expected_stats, rtol=1e-4)
    assert stats[:2].tolist() == [width, height] and stats[4] > 0
