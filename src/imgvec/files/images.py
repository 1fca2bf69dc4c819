"""Finding images under folders and decoding one file to a square RGB array.

Labels follow the Keras ``flow_from_directory`` convention: when folders are given (one
folder of class subfolders, or the class folders one by one), an image's label is its
first-level folder under their common root.
Decoding never raises anything but :class:`ImageSkipped`, so one bad file never stops a run.
Only regular files are ever opened: a FIFO, socket or device named ``x.jpg`` (or a link to
one) is skipped with what it is, never read (a FIFO would block forever, ``/dev/zero`` never ends).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, ContextManager, Iterable, Sequence

import numpy as np

from imgvec.errors import BadInputError, ImageSkipped, ImgvecError, first_line
from imgvec.fileio import NotRegularFile, open_regular
from imgvec.files.values import MAX_ABS_VALUE

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif"})
# Only these decoders may run: a file named .jpg that is really EPS must not reach Ghostscript.
# (AVIF where this Pillow has its decoder, 11.2 and later; elsewhere an .avif file is skipped, saying so.)
PIL_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF", "AVIF")
_FORMAT_OF = {".avif": "AVIF"}  # suffixes whose decoder this Pillow may lack
# Image files imgvec does not decode: found and listed as skipped with the reason, never silently ignored.
UNSUPPORTED_SUFFIXES = frozenset({".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".svg", ".psd", ".ico", ".tga",
                                  ".ppm", ".pgm", ".pbm", ".exr", ".hdr", ".eps", ".xcf", ".dng", ".cr2", ".cr3",
                                  ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw"})
_FOUND_SUFFIXES = IMAGE_SUFFIXES | UNSUPPORTED_SUFFIXES
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
# What embed records of each image beside its row (the store's optional /stats dataset): see pixel_stats.
STATS_COLUMNS = ("width", "height", "brightness", "contrast", "sharpness")
STATS_SIDE = 256  # statistics are measured on a grey copy at most this many pixels a side


def bad_stats_rows(stats: np.ndarray) -> np.ndarray:
    """Rows of ``stats`` that are neither measured (all in [0, MAX_ABS_VALUE], files/values.py) nor unmeasured
    (all NaN): damage."""
    nan = np.isnan(stats)
    measured = (stats >= 0) & (stats <= MAX_ABS_VALUE)  # NaN and inf fail
    return ~(nan.all(axis=1) | measured.all(axis=1))


@dataclass(frozen=True)
class ImageFile:
    path: str  # where to open it
    key: str  # how the store names it: relative to the collection root
    label: str = ""  # first-level subfolder name, "" when unknown


@dataclass(frozen=True)
class Collection:
    root: str
    files: list[ImageFile]

    @property
    def labelled(self) -> bool:
        return any(f.label for f in self.files)


def is_image_name(name: str) -> bool:
    """A name imgvec takes as an image: one it decodes, or one it lists as skipped (an unsupported format)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _FOUND_SUFFIXES


def unsupported(path: str) -> str | None:
    """Why an image file will not be decoded because of its format ("unsupported format ..."), or None."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in UNSUPPORTED_SUFFIXES or _FORMAT_OF.get(suffix, "JPEG") not in pil_formats():
        readable = sorted(s for s in IMAGE_SUFFIXES if _FORMAT_OF.get(s, "JPEG") in pil_formats())
        return f"unsupported format ({suffix}): imgvec reads {', '.join(readable)}"
    return None


def _walk(folder: str) -> Iterable[str]:
    """Image paths under ``folder``, sorted, hidden entries skipped, symlinked folders not followed."""
    for dirpath, dirnames, filenames in os.walk(folder, onerror=None, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_name(name):
                yield os.path.join(dirpath, name)


def key_for(path: str, root: str) -> str:
    """A path relative to ``root`` with '/' separators; absolute when outside the root."""
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return os.path.abspath(path)
    return rel.replace(os.sep, "/")


def find_images(sources: Sequence[str | os.PathLike[str]], root: str | None = None) -> Collection:
    """Every image under ``sources`` (folders walked recursively, files taken as given)."""
    if not sources:
        raise BadInputError("no image files or folders given")
    paths: list[str] = []
    folders: list[str] = []
    for source in sources:
        src = os.path.abspath(os.fspath(source))
        if os.path.isdir(src):
            folders.append(src)
            paths.extend(_walk(src))
        elif os.path.exists(src):  # a file, or a FIFO/device/socket that decoding will skip with its reason
            if os.path.splitext(src)[1].lower() not in _FOUND_SUFFIXES:
                raise BadInputError(
                    f"{source}: not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            paths.append(src)
        else:
            raise BadInputError(f"{source}: no such file or folder")
    if not paths:
        raise BadInputError(f"no images found under {', '.join(map(str, sources))}")
    only_folders = len(folders) == len(sources)
    if root is None:
        if len(folders) == 1 and only_folders:
            root = folders[0]
        elif only_folders:  # class folders given one by one: their common parent, as if it had been given
            root = os.path.commonpath(folders)
        else:
            root = os.path.commonpath([os.path.dirname(p) for p in paths])
    files = []
    seen: set[str] = set()
    for path in paths:
        key = key_for(path, root)
        if key in seen:
            continue
        seen.add(key)
        parts = key.split("/")
        label = parts[0] if only_folders and len(parts) > 1 and not os.path.isabs(key) else ""
        files.append(ImageFile(path, key, label))
    return Collection(root=root, files=files)


def _to_rgb(im: "Image.Image") -> "Image.Image":
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greys: Pillow's convert clips at 255, so scale to 8 bits by hand.
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


@functools.lru_cache(maxsize=1)
def pil_formats() -> tuple[str, ...]:
    """PIL_FORMATS this Pillow has decoders for (MPO is its own plugin only in some versions). Only their plugins
    are imported, not Pillow's other 35 (``Image.init``): half the cost, on the first image a query decodes."""
    import importlib

    from PIL import Image

    for name in ("Jpeg", "Mpo", "Png", "Bmp", "Gif", "WebP", "Tiff", "Avif"):
        with contextlib.suppress(ImportError):  # a Pillow built without it
            importlib.import_module(f"PIL.{name}ImagePlugin")
    return tuple(f for f in PIL_FORMATS if f in Image.OPEN)


def pixel_stats(im: "Image.Image", width: int, height: int) -> np.ndarray:
    """``STATS_COLUMNS`` of a decoded RGB image whose file is ``width`` x ``height``: float32 (5,).

    Brightness and contrast are the mean and standard deviation of the grey levels (0-255);
    sharpness is the variance of the 4-neighbour Laplacian. All three are measured on a grey copy
    at most :data:`STATS_SIDE` pixels a side, which bounds the cost and makes sharpness comparable
    between images of different sizes.
    """
    grey = im.convert("L")
    factor = -(-max(grey.size) // STATS_SIDE)
    if factor > 1:  # a box average over factor x factor blocks: a fifth of what a filtered thumbnail costs
        grey = grey.reduce(factor)
    g = np.asarray(grey, dtype=np.float32)
    lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]) if min(g.shape) > 2 else g * 0
    return np.array([width, height, g.mean(), g.std(), lap.var() if lap.size else 0.0], np.float32)


_GREY_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # the modes _to_rgb scales through float32 by hand
_DECODE_SLACK = 1 << 20  # decoder state, palettes, the small output array


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow stores per pixel of ``mode``: one byte for 1, L, P; two for 16-bit greys; four otherwise
    (multi-band images are stored 32 bits per pixel, I and F are 32-bit)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def decode_cost(im: "Image.Image", size: int, file_bytes: int = 0, full_size: tuple[int, int] | None = None) -> int:
    """The most memory :func:`load_image` holds at once to decode ``im`` (opened, header read, draft applied),
    in bytes: every intermediate of the steps below, each counted while it is alive.

    The decoded image (and an EXIF-rotated copy beside it); the file's bytes; a progressive JPEG's coefficients at full
    size (``full_size``: before draft), 2 bytes per coefficient and band; WebP/AVIF's own decode buffer;
    TIFF's strip as large as the image; the conversion to RGB (16-bit,
    32-bit and float greys: the raw bytes, three float32 arrays; a palette with transparency: RGBA then
    RGB; other modes: RGB); the resize's intermediate row pass.
    """
    width, height = im.size
    pixels = width * height
    stored = pixels * _bytes_per_pixel(im.mode)
    # the image, a transposed copy when EXIF turns it, and the file's bytes once more (PNG's decoder holds
    # about that much: measured 26 MB beside a 26 MB incompressible 3000 x 3000 PNG)
    cost = stored * 2 + file_bytes + _DECODE_SLACK
    if im.format in ("JPEG", "MPO") and (im.info.get("progressive") or im.info.get("progression")):
        full_w, full_h = full_size or im.size
        cost += full_w * full_h * len(im.getbands()) * 2
    elif im.format in ("WEBP", "AVIF"):
        cost += pixels * 8
    elif im.format == "TIFF":
        cost += pixels * 4
    elif im.format == "GIF":
        cost += pixels * 4
    if im.mode in _GREY_WIDE:
        cost += stored + pixels * 12
    elif im.mode == "P" and "transparency" in im.info:
        cost += pixels * 8
    elif im.mode != "RGB":
        cost += pixels * 4
    # a quarter more for what is not itemised: Pillow's 16 MB blocks of whole lines, the allocator's rounding
    return (cost + size * max(width, height) * 4) * 5 // 4


def load_image(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               data: BinaryIO | None = None,
               reserve: Callable[[int], ContextManager[object]] | None = None) -> np.ndarray:
    """Decode ``path`` to a ``(size, size, 3)`` uint8 RGB array, upright (EXIF), first frame.

    ``data``: the image's bytes already in hand (an upload to ``imgvec serve``); ``path`` then only names it.
    ``reserve``: given the bytes decoding will hold at most (:func:`decode_cost`, known from the header before
    any pixel is decoded), a context to decode in (``imgvec serve``'s shared memory budget); its errors pass.
    Raises :class:`ImageSkipped` with a readable reason for anything that is not a usable image.
    """
    return load_image_stats(path, size, max_pixels, data, stats=False, reserve=reserve)[0]


def load_image_stats(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, data: BinaryIO | None = None,
                     stats: bool = True, reserve: Callable[[int], ContextManager[object]] | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`load_image` and the image's :func:`pixel_stats` from the same decoded pixels (None unless ``stats``)."""
    from PIL import Image, ImageOps

    reason = unsupported(path)
    if reason:
        raise ImageSkipped(path, reason)
    try:
        with (open_regular(path) if data is None else contextlib.nullcontext(data)) as fh, \
                Image.open(fh, formats=pil_formats()) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageSkipped(
                    path, f"{width}x{height} pixels is over the limit of {max_pixels} (--max-pixels)"
                )
            if im.format in ("JPEG", "MPO"):
                # Decode at a reduced DCT scale where the target size allows: far less work.
                im.draft("RGB", (size, size))
            # the grey copy pixel_stats measures is held beside the RGB image (one byte a pixel)
            cost = decode_cost(im, size, _size_of(fh), (width, height)) + (im.size[0] * im.size[1] if stats else 0)
            with reserve(cost) if reserve else contextlib.nullcontext():
                im.seek(0)
                ImageOps.exif_transpose(im, in_place=True)  # without an orientation tag, not even a copy
                im = _to_rgb(im)
                measured = pixel_stats(im, width, height) if stats else None
                im = im.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(im, dtype=np.uint8), measured
    except ImageSkipped:
        raise
    except ImgvecError:  # the reservation's refusal (over the budget, busy): the caller's to tell
        raise
    except NotRegularFile as error:
        raise ImageSkipped(path, error.strerror) from None
    except FileNotFoundError:
        raise ImageSkipped(path, "file not found") from None
    except PermissionError:
        raise ImageSkipped(path, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageSkipped(path, "not a recognised image") from None
    except Image.DecompressionBombError as error:
        raise ImageSkipped(path, f"decompression bomb refused by Pillow: {error}") from None
    except OSError as error:
        if error.filename is not None:  # opening failed (a link loop, a name too long, ...)
            raise ImageSkipped(path, f"cannot read: {error.strerror or error}") from None
        raise ImageSkipped(path, f"cannot decode: {first_line(error)}") from None
    except Exception as error:  # any decoder failure: truncated, bad CRC, bad header ...
        raise ImageSkipped(path, f"cannot decode: {first_line(error)}") from None


def _size_of(fh: BinaryIO) -> int:
    """The bytes of an open file or buffer (0 when it cannot tell)."""
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        buffer = getattr(fh, "getbuffer", None)
        return buffer().nbytes if buffer else 0
