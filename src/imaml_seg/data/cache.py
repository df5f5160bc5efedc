"""Preprocessed arrays per dataset and resolution, cached as ``.npz`` files.

Preprocessing, decided once for every dataset:

* **Stretch, don't pad**: every image and mask is resized to ``R x R`` ignoring the aspect ratio.
  ISIC2018 is already stretched to 512x512 by its source, the other sets are all near 4:3, padding
  would waste a quarter of the pixels at the 64-128 px the CPU budget allows, and predictions are
  resized back to the original size anyway.
* Images: decoded at full size, then Pillow's bilinear resize (antialiased when shrinking), so
  that ``preprocess(load_image(p), ...)`` at prediction time is bit-identical to the cache.
  (Decoding JPEGs at a reduced DCT scale with Pillow ``draft`` would save about 1 ms per image,
  2-3 s per dataset, but shifts pixels by about 0.02 std from what prediction sees.)
* Masks: thresholded at full size (see ``validate``), then resized with **nearest neighbour**.  At
  64-128 px DRIVE's vessels are thinner than one output pixel: area averaging with a 0.5 threshold
  deletes every vessel narrower than half a pixel (15 % of the vessel area at 128 px, 40 % at
  64 px), while nearest sampling keeps the vessel area (7.7 % vs 7.5 % of the image at 128 px), at
  the price of broken lines.  For blob-like lesions the two differ by at most half a pixel.
* Intensities: per image and channel, ``(x - mean) / (std + 1e-6)`` on values scaled to [0, 1]
  (``normalise``; the synthetic generator uses the same function).

The cache stores the resized ``uint8`` images and masks (4x smaller than float32) and normalises on
load.  Its file name holds the dataset name, the resolution and a fingerprint of the source files
(relative path, size and mtime of every file), so editing, adding or removing a file rebuilds it.
Files are written atomically (temporary file + ``os.replace``) and never next to the dataset.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from imaml_seg.data.readers import Pair, read_dataset, resolve_dataset
from imaml_seg.data.validate import DataError, Problem, check_pair

CACHE_ENV = "IMAML_SEG_CACHE"
CACHE_FORMAT = 1
"""Bump when preprocessing changes, so that old cache files are no longer used."""
EPS = 1e-6
MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous; compare fields instead
class SegArrays:
    """A whole dataset preprocessed at one resolution, channel-first."""

    images: np.ndarray
    """``(N, 3, R, R)`` float32, standardised per image and channel."""
    masks: np.ndarray
    """``(N, 1, R, R)`` float32 in {0, 1}."""
    names: tuple[str, ...]
    """Image file stems (or synthetic ids), one per image."""
    name: str
    """Dataset name: canonical ('Kvasir-SEG'), folder name, or 'synthetic:<domain>'."""

    def __post_init__(self) -> None:
        n = len(self.names)
        r = self.images.shape[-1] if self.images.ndim == 4 else -1
        if self.images.shape != (n, 3, r, r) or self.masks.shape != (n, 1, r, r):
            raise ValueError(f"{self.name}: images {self.images.shape}, masks {self.masks.shape} "
                             f"and {n} names do not match (N, 3, R, R) / (N, 1, R, R)")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])


def normalise(images: np.ndarray) -> np.ndarray:
    """Standardise ``(..., C, H, W)`` per image and channel: ``(x - mean) / (std + 1e-6)``.

    ``uint8`` input is scaled to [0, 1] first; float input must already be in [0, 1].  Returns
    float32.  Why per image: colonoscopy, dermoscopy and fundus cameras differ wildly in
    brightness and colour, and a few-shot learner should not spend its support set on that.
    """
    shape = images.shape
    x = images.astype(np.float32).reshape(-1, shape[-2] * shape[-1])  # one row per image channel
    unit = 255.0 if images.dtype == np.uint8 else 1.0  # work in 0..255: (x - m) / (s + 255 eps)
    x -= x.mean(axis=1, keepdims=True)
    std = np.sqrt(np.einsum("ij,ij->i", x, x) / x.shape[1])  # centred first: no cancellation
    x *= (1.0 / (std + EPS * unit)).astype(np.float32)[:, None]
    x = x.reshape(shape)
    return x


def resize_pair(image: np.ndarray, mask: np.ndarray, resolution: int) -> tuple[np.ndarray, ...]:
    """Stretch ``uint8 (H, W, 3)``, ``bool (H', W')`` to ``uint8 (3, R, R)``, ``bool (1, R, R)``.

    Image bilinear (antialiased), mask nearest neighbour (keeps thin vessels; see module doc).
    """
    small_mask = Image.fromarray(mask).resize((resolution, resolution), Image.Resampling.NEAREST)
    return resize_image(image, resolution), np.asarray(small_mask)[None].copy()


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Stretch ``uint8 (H, W, 3)`` to ``uint8 (3, R, R)`` (bilinear, antialiased)."""
    small = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(small).transpose(2, 0, 1).copy()


def preprocess(
    image: np.ndarray, mask: np.ndarray, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (H, W, 3)``, ``bool (H, W)`` -> image ``(3, R, R)`` float32 normalised, mask
    ``(1, R, R)`` float32 in {0, 1}: exactly what ``load_arrays`` returns for that pair."""
    small, small_mask = resize_pair(image, mask, resolution)
    return normalise(small), small_mask.astype(np.float32)


def cache_dir_from(arg: str | Path | None) -> Path:
    """The cache folder: ``arg``, else ``$IMAML_SEG_CACHE``, else ``~/.cache/imaml-seg``."""
    value = arg if arg not in (None, "") else os.environ.get(CACHE_ENV) or "~/.cache/imaml-seg"
    return Path(value).expanduser()


def fingerprint(pairs: list[Pair], root: Path) -> str:
    """sha1 of the sorted (relative path, size, mtime_ns) of every image and mask file."""
    rows = []
    for pair in pairs:
        for path in (pair.image, *pair.masks):
            stat = path.stat()
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            rows.append(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}")
    digest = hashlib.sha1(f"format {CACHE_FORMAT}\n".encode())
    for row in sorted(rows):
        digest.update(row.encode() + b"\n")
    return digest.hexdigest()


def cache_path(cache_dir: Path, name: str, resolution: int, print_: str) -> Path:
    """Where the arrays of dataset ``name`` at ``resolution`` with fingerprint ``print_`` live."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"
    return Path(cache_dir) / f"{slug}-{resolution}px-{print_[:16]}.npz"


def _error_summary(folder: Path, problems: list[Problem]) -> str:
    errors = [p for p in problems if p.severity == "error"]
    shown = "; ".join(str(p) for p in errors[:MAX_LISTED_PROBLEMS])
    more = len(errors) - MAX_LISTED_PROBLEMS
    tail = f"; and {more} more (the dataset report lists them all)" if more > 0 else ""
    return f"{len(errors)} data error(s) in {folder}: {shown}{tail}"


def _build(pairs: list[Pair], resolution: int, name: str, problems: list[Problem],
           folder: Path, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    n = len(pairs)
    images = np.zeros((n, 3, resolution, resolution), np.uint8)
    masks = np.zeros((n, 1, resolution, resolution), np.uint8)
    problems = list(problems)
    bar = tqdm(pairs, desc=f"{name} {resolution}px", unit="img", disable=not progress)
    for i, pair in enumerate(bar):
        checked = check_pair(pair.image, pair.masks)
        problems += checked.problems
        if checked.image is not None and checked.mask is not None:
            images[i], masks[i] = resize_pair(checked.image, checked.mask, resolution)
    if any(p.severity == "error" for p in problems):
        raise DataError(_error_summary(folder, problems))
    return images, masks


def _read_cache(path: Path, name: str) -> SegArrays | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, masks, names = npz["images"], npz["masks"], npz["names"]
        return SegArrays(normalise(images), masks.astype(np.float32),
                         tuple(str(s) for s in names), name)
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable or stale: rebuilt by the caller


def _write_cache(
    path: Path, images: np.ndarray, masks: np.ndarray, names: list[str], source: Path
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=images,
                masks=masks,
                names=np.array(names, dtype=str),
                source=np.array(str(source.resolve())),
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_source(path: Path) -> str | None:
    """The dataset folder a cache file was built from (None for files that do not say)."""
    try:
        with np.load(path) as npz:
            return str(npz["source"]) if "source" in npz.files else None
    except (OSError, ValueError, EOFError):
        return None


def prune_superseded(path: Path, source: Path) -> list[Path]:
    """Delete the cache files of the same folder and resolution as ``path`` built from older
    versions of its files (other fingerprints), so that the cache does not grow each time the
    dataset's files are touched.  Files of other folders, or that do not name theirs, are kept.
    Returns the deleted paths."""
    prefix = path.name.rsplit("-", 1)[0]
    source_name = str(source.resolve())
    removed = []
    for other in path.parent.glob(f"{glob.escape(prefix)}-*.npz"):
        if other == path or re.fullmatch(r"[0-9a-f]+\.npz", other.name[len(prefix) + 1 :]) is None:
            continue
        if _cached_source(other) == source_name:
            try:
                other.unlink()
            except OSError:
                continue
            removed.append(other)
    return removed


def load_arrays(
    spec: str,
    resolution: int,
    *,
    data_root: Path | None,
    cache_dir: Path | None,
    progress: bool = False,
) -> SegArrays:
    """A dataset preprocessed at ``resolution``: from the cache, or read, validated and cached.

    ``spec`` is a known dataset name (under ``data_root``), a folder, ``synthetic:<domain>``
    (optionally ``synthetic:<domain>:<n>``; generated, not cached), or a cache file
    (``<name>-<R>px-<fingerprint>.npz``) used as it is, on a machine without the raw files.
    Raises DataError listing the first few problems (and how many there are) if any pair has an
    error; warnings are ignored.
    """
    if spec.startswith("synthetic:"):
        from imaml_seg.data.synthetic import parse_synthetic, synthetic_arrays

        domain, n = parse_synthetic(spec)
        return synthetic_arrays(domain, n=n, resolution=resolution)

    if spec.endswith(".npz"):
        return load_array_file(Path(spec), resolution)

    name, folder, _ = resolve_dataset(spec, data_root)
    pairs, problems = read_dataset(spec, data_root)
    cache_dir = cache_dir_from(cache_dir)
    if cache_dir.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"cache folder {cache_dir} is inside the dataset; choose another "
                        f"(--cache-dir or ${CACHE_ENV})", folder)
    path = cache_path(cache_dir, name, resolution, fingerprint(pairs, folder))
    if path.is_file():
        cached = _read_cache(path, name)
        if cached is not None and len(cached) == len(pairs) and cached.resolution == resolution:
            return cached
    images, masks = _build(pairs, resolution, name, problems, folder, progress)
    names = [pair.image.stem for pair in pairs]
    try:
        _write_cache(path, images, masks, names, folder)
        prune_superseded(path, folder)
    except OSError as err:  # a read-only cache folder costs speed, not correctness
        warnings.warn(f"{path}: could not write the cache: {err}", stacklevel=2)
    return SegArrays(normalise(images), masks.astype(np.float32), tuple(names), name)


def load_array_file(path: Path, resolution: int) -> SegArrays:
    """A cache file used directly as a dataset (named by its file name)."""
    match = re.fullmatch(r"(.+)-(\d+)px-[0-9a-f]+\.npz", path.name)
    if not path.is_file():
        raise DataError("preprocessed array file not found", path)
    if match is None:
        raise DataError("not an imaml-seg array file (expected <name>-<R>px-<hash>.npz)", path)
    if int(match.group(2)) != resolution:
        raise DataError(f"preprocessed at {match.group(2)} px, the run asks for {resolution} px",
                        path)
    arrays = _read_cache(path, match.group(1))
    if arrays is None:
        raise DataError("unreadable or damaged array file", path)
    return arrays
