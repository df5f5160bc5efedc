"""Segment a folder of images with a (usually adapted) checkpoint.

Writes, for every image ``<stem>.<ext>`` of the input folder:
``masks/<stem>.png`` (0/255, at the image's original size), ``overlays/<stem>.png`` (the mask
in green over the image), and one row of ``areas.csv`` (lesion pixels and area fraction).
Nothing is written until every input image has been read, existing outputs are never replaced
without ``overwrite=True``, and an output folder inside the input folder is refused.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from imaml_seg.checkpoint import Checkpoint
from imaml_seg.data.cache import normalise, resize_image
from imaml_seg.data.readers import IMAGE_SUFFIXES, image_files
from imaml_seg.data.validate import DataError, load_image
from imaml_seg.evaluation import predict_logits
from imaml_seg.meta.trainer import device_default
from imaml_seg.model import build_model
from imaml_seg.plots import overlay


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in natural name order."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def output_paths(out: Path, stem: str) -> tuple[Path, Path]:
    return out / "masks" / f"{stem}.png", out / "overlays" / f"{stem}.png"


def _check_outputs(images: list[Path], source: Path, out: Path, overwrite: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise DataError(f"{out}: output folder is inside the input folder {source}; choose another")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise DataError(f"{source}: images share the stem(s) {dup[:3]}; masks would collide")
    if overwrite:
        return
    existing = [p for s in stems for p in output_paths(out, s) if p.exists()]
    if (out / "areas.csv").exists():
        existing.append(out / "areas.csv")
    if existing:
        raise FileExistsError(
            f"{existing[0]}: exists ({len(existing)} outputs in all); pass --overwrite to replace"
        )


def check_outputs(images_dir: Path, out: Path, overwrite: bool) -> list[Path]:
    """The images of ``images_dir``, after checking that writing their outputs into ``out`` is
    safe (not inside the input, no stem collisions, nothing overwritten unless ``overwrite``).
    Cheap: the CLI calls it before adapting, so a refusal comes before minutes of work."""
    files = list_images(images_dir)
    _check_outputs(files, images_dir, out, overwrite)
    return files


def predict_folder(
    checkpoint: Checkpoint,
    images_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    threshold: float = 0.5,
    batch: int = 16,
) -> list[dict]:
    """Segment every image of ``images_dir`` into ``out``; returns the ``areas.csv`` rows."""
    files = check_outputs(images_dir, out, overwrite)
    raw = [load_image(p) for p in files]  # raises a DataError naming the first bad file
    device = device_default()
    model = build_model(checkpoint.config.model).to(device)
    params = {k: v.to(device) for k, v in checkpoint.theta.items()}
    r = checkpoint.config.data.resolution
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=quiet)
    for start in range(0, len(files), batch):
        chunk = raw[start : start + batch]
        small = np.stack([resize_image(img, r) for img in chunk])
        with torch.no_grad():
            x = torch.from_numpy(normalise(small))
            logits = predict_logits(model, params, x, device, tta=checkpoint.config.eval.tta)
        for path, img, logit in zip(files[start : start + batch], chunk, logits, strict=True):
            h, w = img.shape[:2]
            prob = torch.sigmoid(
                F.interpolate(logit[None], size=(h, w), mode="bilinear", align_corners=False)
            )[0, 0].numpy()
            mask = prob >= threshold
            mask_path, overlay_path = output_paths(out, path.stem)
            Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
            Image.fromarray((overlay(img / 255.0, mask) * 255).astype(np.uint8)).save(overlay_path)
            rows.append(
                {
                    "image": path.name,
                    "width": w,
                    "height": h,
                    "lesion_pixels": int(mask.sum()),
                    "lesion_fraction": round(float(mask.mean()), 6),
                }
            )
            bar.update(1)
    bar.close()
    with open(out / "areas.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows
