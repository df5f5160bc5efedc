"""Reading images and masks, and finding every problem in a dataset, each naming its file.

Every image becomes ``uint8 (H, W, 3)`` and every mask ``bool (H, W)``, whatever the format:
greyscale, RGBA (alpha dropped), palette, 1-bit, 16-bit and float images are converted; TIFFs
that Pillow cannot open (the raw CVC-ClinicDB download declares 3 samples with MinIsBlack) are read
with ``tifffile`` instead.

Pixel-value rules, in one place:

* 16-bit (or wider integer) data is scaled to 8 bit by ``round(v / 257)``, except when its maximum
  is at most 255: then the file is an 8-bit image stored in a wider container and is kept as is.
  Float data is taken as [0, 1] when its maximum is at most 1, else as [0, 255].
* A mask is reduced to grey (ITU-R 601 luma, as Pillow's ``convert('L')``) and thresholded at
  ``>= 128``.  One exception: a mask whose maximum grey value is exactly 1 is a 0/1 label image, so
  1 is foreground (thresholding it at 128 would make every such mask empty).
* A mask is "not binary" when more than 5 % of its pixels are grey, i.e. in (32, 224); JPEG masks
  and anti-aliased borders give a few such pixels, which is fine.
* An empty mask is kept (a valid "no lesion" example, e.g. BUSI's normal scans) but reported as a
  warning; how an empty mask is scored is the metrics' empty-mask policy.

Validation reports *all* problems at once instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from imaml_seg.data.readers import Pair

MAX_PIXELS = 100_000_000
"""Images with more pixels than this are refused (a decompression bomb or a whole-slide image)."""
GREY_LOW, GREY_HIGH = 32, 224
"""Mask grey values strictly between these count as grey (neither background nor foreground)."""
MAX_GREY_FRACTION = 0.05
"""A mask with a larger share of grey pixels is an error: it is probably not a mask at all."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class DataError(Exception):
    """A dataset, file or request that cannot be used; the message names the file and the problem.

    ``path`` and ``detail`` hold the two parts separately (``path`` is None when no single file or
    folder is to blame, e.g. asking for more shots than a pool holds).
    """

    def __init__(self, detail: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.detail = " ".join(str(detail).split())
        super().__init__(self.detail if self.path is None else f"{self.path}: {self.detail}")


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset: a file (or folder), what is wrong, how bad."""

    path: str
    message: str
    severity: str = "error"
    """'error' (the dataset cannot be used as is) or 'warning' (usable, but worth knowing)."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ----------------------------------------------------------------------------- decoding


def _pillow_array(im: Image.Image) -> np.ndarray:
    """Pixels of a loaded Pillow image as ``(H, W)`` or ``(H, W, C)``, in their native type."""
    mode = im.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "F", "I"):
        return np.array(im)
    if mode.startswith("I;16"):
        return np.array(im).astype(np.uint16)
    if mode in ("P", "PA"):
        return np.array(im.convert("RGBA"))
    return np.array(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _read_pillow(path: Path, draft: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    with Image.open(path) as im:
        width, height = im.size
        _check_size(path, width, height)
        if draft and im.format == "JPEG":
            im.draft(None, (draft, draft))  # decode at 1/2, 1/4 or 1/8 size, never below draft
        im.load()
        return _pillow_array(im), (height, width)


def _read_tifffile(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        axes = page.axes
        shape = dict(zip(axes, page.shape, strict=True))
        _check_size(path, shape.get("X", 0), shape.get("Y", 0))
        array = np.asarray(page.asarray())
        if axes.startswith("S") and array.ndim == 3:  # planar: (samples, H, W)
            array = np.moveaxis(array, 0, -1)
        if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE and array.ndim == 2:
            if array.dtype == np.bool_:
                array = ~array
            elif array.dtype.kind in "ui":
                array = np.iinfo(array.dtype).max - array
            else:
                array = 1.0 - array
    return array, (shape.get("Y", 0), shape.get("X", 0))


def _check_size(path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise DataError(f"image has zero size ({width}x{height})", path)
    if width * height > MAX_PIXELS:
        raise DataError(f"image too large ({width}x{height} pixels)", path)


def _decode(path: str | Path, draft: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Raw pixels ``(H, W[, C])`` and the file's full size ``(H, W)``; DataError if unreadable.

    With ``draft``, JPEGs decode at a reduced size (at least ``draft`` on both sides), which is
    several times faster; other formats ignore it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", path)
    try:
        return _read_pillow(path, draft)
    except DataError:
        raise
    except Exception as pillow_err:  # Pillow raises many types on corrupt input
        try:
            with path.open("rb") as f:
                is_tiff = f.read(4) in _TIFF_MAGIC
        except OSError as err:
            raise DataError(f"cannot read image: {err}", path) from None
        if is_tiff:
            try:
                return _read_tifffile(path)
            except DataError:
                raise
            except Exception as tiff_err:
                raise DataError(f"cannot read image: {tiff_err}", path) from None
        raise DataError(f"cannot read image: {pillow_err}", path) from None


def _to_uint8(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Scale pixel values to uint8 by the rules in the module docstring."""
    if array.size == 0:
        raise DataError(f"image has zero size ({'x'.join(map(str, array.shape))})", path)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        scale = 257.0 if high <= 65535 else high / 255.0
        return np.clip(np.rint(array / scale), 0, 255).astype(np.uint8)
    if array.dtype.kind == "f":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if array.max() <= 1.0:
            array = array * 255.0
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    raise DataError(f"cannot read image: unsupported pixel type {array.dtype}", path)


def _channels(array: np.ndarray, path: str | Path) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` with C in 1..4 -> ``(H, W, C)`` with C in {1, 3}."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3 and array.shape[2] in (1, 2):
        return array[:, :, :1]  # grey (+ alpha)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3]  # RGB (+ alpha)
    raise DataError(f"cannot read image: unsupported pixel layout {array.shape}", path)


def _image_from_raw(raw: np.ndarray, path: str | Path) -> np.ndarray:
    pixels = _channels(_to_uint8(raw, path), path)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


def _grey_from_raw(raw: np.ndarray, path: str | Path) -> np.ndarray:
    pixels = _channels(_to_uint8(raw, path), path)
    if pixels.shape[2] == 1:
        return np.ascontiguousarray(pixels[:, :, 0])
    return np.array(Image.fromarray(np.ascontiguousarray(pixels)).convert("L"))


def load_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as ``uint8 (H, W, 3)``; DataError naming the file if unreadable."""
    raw, _ = _decode(path)
    return _image_from_raw(raw, path)


def load_mask_grey(path: str | Path) -> np.ndarray:
    """The mask at ``path`` as grey ``uint8 (H, W)``, before thresholding."""
    raw, _ = _decode(path)
    return _grey_from_raw(raw, path)


def binarise(grey: np.ndarray) -> np.ndarray:
    """``bool (H, W)`` foreground of a grey ``uint8`` mask: ``>= 128``; ``== 1`` for 0/1 masks."""
    if grey.size and int(grey.max()) == 1:
        return grey == 1
    return grey >= 128


def load_mask(path: str | Path) -> np.ndarray:
    """The mask at ``path`` as ``bool (H, W)`` (rules in the module docstring)."""
    return binarise(load_mask_grey(path))


def mask_grey_fraction(grey: np.ndarray) -> float:
    """Share of a grey ``uint8`` mask's pixels that are neither clearly off nor on: in (32, 224)."""
    if grey.size == 0:
        return 0.0
    return float(np.count_nonzero((grey > GREY_LOW) & (grey < GREY_HIGH)) / grey.size)


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class CheckedPair:
    """What ``check_pair`` read: the pixels (None where unreadable) and every problem found."""

    image: np.ndarray | None
    """``uint8 (H, W, 3)``; smaller than the file's size if read with a JPEG ``draft`` size."""
    mask: np.ndarray | None
    """``bool (H, W)`` at the file's full size: the union of all mask files."""
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return self.image is not None and self.mask is not None and not any(
            p.severity == "error" for p in self.problems
        )


def check_pair(
    image_path: str | Path,
    mask_paths: Sequence[str | Path],
    *,
    fov: str | Path | None = None,
    draft: int | None = None,
) -> CheckedPair:
    """Read one image with its mask files (united by logical OR) and report every problem.

    Used both to validate and to load for the cache, so each file is decoded once.  ``draft``
    lets JPEG images decode at reduced size, for validation, where only readability and the size
    (read from the header) matter; masks always decode at full size, as the grey check needs.
    """
    problems: list[Problem] = []
    image = None
    size = None
    try:
        raw, size = _decode(image_path, draft)
        image = _image_from_raw(raw, image_path)
    except DataError as err:
        problems.append(Problem(str(image_path), err.detail))

    mask = None
    for mask_path in mask_paths:
        try:
            grey = load_mask_grey(mask_path)
        except DataError as err:
            problems.append(Problem(str(mask_path), err.detail))
            continue
        h, w = grey.shape
        if size is not None and (h, w) != size:
            problems.append(Problem(
                str(mask_path),
                f"mask is {w}x{h} but its image {Path(image_path).name} is {size[1]}x{size[0]}",
            ))
            continue
        if mask is not None and mask.shape != grey.shape:
            problems.append(Problem(str(mask_path), f"mask is {w}x{h}, unlike the pair's first "
                                    f"mask ({mask.shape[1]}x{mask.shape[0]})"))
            continue
        fraction = mask_grey_fraction(grey)
        if fraction > MAX_GREY_FRACTION:
            problems.append(Problem(
                str(mask_path), f"mask is not binary: {100 * fraction:.1f}% of pixels are grey"
            ))
            continue
        fg = binarise(grey)
        mask = fg if mask is None else mask | fg

    errors = any(p.severity == "error" for p in problems)
    if mask is not None and not errors and not mask.any():
        where = mask_paths[0] if len(mask_paths) == 1 else Path(mask_paths[0]).parent
        problems.append(Problem(
            str(where), "mask is empty (no foreground): kept as a 'no lesion' example", "warning"
        ))

    if fov is not None:
        try:
            fov_size = load_mask_grey(fov).shape
            if size is not None and fov_size != size:
                problems.append(Problem(str(fov), f"field-of-view mask is {fov_size[1]}x"
                                        f"{fov_size[0]} but its image is {size[1]}x{size[0]}"))
        except DataError as err:
            problems.append(Problem(str(fov), err.detail))

    ok = not any(p.severity == "error" for p in problems)
    return CheckedPair(image if ok else None, mask if ok else None, tuple(problems))


def validate_pair(
    image_path: str | Path,
    mask_path: str | Path,
    *,
    extra_masks: Sequence[str | Path] = (),
    fov: str | Path | None = None,
) -> list[Problem]:
    """Every problem of one image/mask pair (empty list: fine)."""
    image_draft = 64  # only readability matters for the image, so decode JPEGs small
    return list(
        check_pair(image_path, [mask_path, *extra_masks], fov=fov, draft=image_draft).problems
    )


def validate_pairs(pairs: Iterable[Pair]) -> list[Problem]:
    """Every problem of every pair, in pair order (all of them, not just the first)."""
    problems: list[Problem] = []
    for pair in pairs:
        problems += validate_pair(pair.image, pair.mask, extra_masks=pair.extra_masks, fov=pair.fov)
    return problems
