"""Copy datasets at ``R x R`` px in their official layouts, for a machine that cannot hold them.

Why: the lent GPU machine receives at most 64 MiB with the working tree, and the four datasets
are 165 MB.  Each pair is decoded, checked and resized exactly as the cache does
(``imaml_seg.data.cache.resize_pair``), then written under the same relative path, so that the
cache built from the copy at ``R`` px equals the cache built from the originals except for the
lossy re-encoding of JPEG images (masks and TIFF/PNG/GIF images are lossless; the script prints
the largest pixel difference per dataset).  ``--quality Q`` stores every colour image, TIFFs
included, as JPEG data at quality ``Q`` under its original name: the only way the four datasets
fit at 256 px.  ``--lossless`` stores JPEG-named images as PNG data
under their original names (the readers go by content, not by suffix): larger, but then the cache
built from the copy equals the one built from the originals.  DRIVE's field-of-view masks are
copied too (nearest).

    python scripts/shrink_datasets.py --data-root ../shared/data --out .gpudata --resolution 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from imaml_seg.data.cache import resize_pair
from imaml_seg.data.readers import read_dataset, resolve_dataset
from imaml_seg.data.validate import DataError, check_pair, load_mask_grey

DATASETS = ("Kvasir-SEG", "CVC-ClinicDB", "ISIC2018", "DRIVE")


def write(
    path: Path, pixels: np.ndarray, lossless: bool = False, quality: int | None = None
) -> None:
    """Save ``uint8 (H, W)`` or ``(H, W, 3)`` in the format the file name says (PNG data for a
    JPEG name when ``lossless``; JPEG data at ``quality`` for any colour image when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if quality is not None and pixels.ndim == 3:
        Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    elif suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, pixels, compression="zlib", predictor=True)
    elif suffix in (".jpg", ".jpeg") and lossless:
        Image.fromarray(pixels).save(path, format="PNG")
    elif suffix in (".jpg", ".jpeg"):
        Image.fromarray(pixels).save(path, quality=95, subsampling=0)
    else:
        Image.fromarray(pixels).save(path)


def shrink(
    name: str,
    data_root: Path,
    out: Path,
    resolution: int,
    lossless: bool = False,
    quality: int | None = None,
) -> float:
    """Write dataset ``name`` at ``resolution``; the largest image pixel change from re-encoding."""
    _, folder, _ = resolve_dataset(name, data_root)
    pairs, _ = read_dataset(name, data_root)
    worst = 0.0
    for pair in pairs:
        checked = check_pair(pair.image, pair.masks)
        if checked.image is None or checked.mask is None:
            raise DataError(f"{checked.problems[0]}")
        image, mask = resize_pair(checked.image, checked.mask, resolution)
        image_out = out / folder.name / pair.image.relative_to(folder)
        write(image_out, image.transpose(1, 2, 0), lossless, quality)
        write(out / folder.name / pair.mask.relative_to(folder), mask[0].astype(np.uint8) * 255)
        if pair.fov is not None:
            fov = Image.fromarray(load_mask_grey(pair.fov))
            fov = fov.resize((resolution, resolution), Image.Resampling.NEAREST)
            write(out / folder.name / pair.fov.relative_to(folder), np.asarray(fov))
        back = check_pair(image_out, [out / folder.name / pair.mask.relative_to(folder)])
        if not np.array_equal(back.mask, mask[0]):
            raise DataError(f"{pair.mask}: mask changed when written at {resolution} px")
        diff = np.abs(back.image.astype(int) - image.transpose(1, 2, 0).astype(int)).max()
        worst = max(worst, float(diff))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument(
        "--lossless", action="store_true", help="PNG data for JPEG-named images (exact, larger)"
    )
    parser.add_argument(
        "--quality",
        type=int,
        help="JPEG data at this quality for every colour image, TIFFs too (smallest, lossy;"
        " for 256 px, whose exact copies exceed the machine's 64 MiB)",
    )
    args = parser.parse_args(argv)
    if args.lossless and args.quality is not None:
        parser.error("--lossless and --quality exclude each other")
    if args.quality is not None and not 1 <= args.quality <= 100:
        parser.error(f"--quality {args.quality}: a JPEG quality is 1 to 100")
    if args.out.resolve() == args.data_root.resolve() or args.out.exists():
        print(f"error: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    try:
        for name in args.datasets:
            worst = shrink(
                name, args.data_root, args.out, args.resolution, args.lossless, args.quality
            )
            print(f"{name}: written; largest image pixel change from re-encoding {worst:.0f}/255")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
