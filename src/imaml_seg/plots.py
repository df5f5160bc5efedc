"""Figures: learning curves, prediction overlays, Dice against shots.  PNG via matplotlib (Agg),
stored as 256-colour palette images (about a third of the bytes of RGBA: the study's figures
are committed and travel with the working tree)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 110


def save_png(fig: Figure, png: Path) -> Path:
    """Write ``fig`` to ``png`` as a 256-colour palette PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    palette.save(png, optimize=True)
    return Path(png)


def learning_curve(log_path: Path, png: Path) -> Path | None:
    """Training loss and validation Dice against step, from a run's JSON-lines log."""
    if not Path(log_path).exists():
        return None
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    return learning_curves({Path(log_path).parent.name: records}, png)


def learning_curves(logs: dict[str, list[dict]], png: Path) -> Path | None:
    """One panel per run: training loss (query loss for meta-learners) and validation Dice
    against step, from log records ``{"step", "loss" | "query_loss", "start_query_loss"?,
    "val_dice"?}``; the query loss of the start itself (``meta.start_weight``) in grey."""
    panels = []
    for name, records in logs.items():
        losses = [(r["step"], r.get("query_loss", r.get("loss"))) for r in records]
        losses = [(step, v) for step, v in losses if v is not None]
        starts = [(r["step"], r["start_query_loss"]) for r in records if "start_query_loss" in r]
        vals = [(r["step"], r["val_dice"]) for r in records if "val_dice" in r]
        if losses:
            panels.append((name, losses, starts, vals))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, losses, starts, vals) in zip(axes.flat, panels, strict=False):
        ax.plot(*zip(*losses, strict=True), lw=1, color="tab:blue", label="train loss")
        if starts:
            ax.plot(*zip(*starts, strict=True), lw=1, color="tab:gray", label="start's query loss")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if vals:
            ax2 = ax.twinx()
            ax2.plot(*zip(*vals, strict=True), "o-", color="tab:orange", label="validation Dice")
            ax2.set_ylabel("validation Dice")
            ax2.set_ylim(0, 1)
        ax.set_title(name)
    fig.tight_layout()
    return save_png(fig, png)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A standardised (3, H, W) image as displayable (H, W, 3) floats in [0, 1]."""
    img = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1)
    lo, hi = np.percentile(img, 1), np.percentile(img, 99)
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def overlay(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """Prediction in green over the image; ground truth outline (if given) in red."""
    out = rgb.copy()
    p = pred.astype(bool)
    out[p] = 0.55 * out[p] + 0.45 * np.array([0.1, 0.9, 0.2])
    if truth is not None:
        t = truth.astype(bool)
        edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
        out[edge] = [1.0, 0.1, 0.1]
    return out


def overlay_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[np.ndarray], Sequence[np.ndarray]]],
    png: Path,
    col_titles: Sequence[str] | None = None,
) -> Path:
    """A grid, one row per method: (label, images (3,H,W), predictions (H,W), truths (H,W))."""
    ncols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(1.9 * ncols, 2.0 * len(rows)), squeeze=False
    )
    for i, (label, images, preds, truths) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(images):
                ax.imshow(overlay(to_rgb(images[j]), preds[j], truths[j]))
                if col_titles and i == 0:
                    ax.set_title(col_titles[j], fontsize=7)
        axes[i][0].text(
            -0.05,
            0.5,
            label,
            transform=axes[i][0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.tight_layout()
    return save_png(fig, png)


def dice_vs_shots(
    curves: dict[str, dict[int, tuple[float, float, float]]], png: Path, title: str
) -> Path:
    """Mean Dice with 95 % CI against shots, one line per method: {method: {k: (mean, lo, hi)}}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, points in curves.items():
        ks = sorted(points)
        mean = [points[k][0] for k in ks]
        ax.plot(ks, mean, "o-", label=method)
        ax.fill_between(ks, [points[k][1] for k in ks], [points[k][2] for k in ks], alpha=0.15)
    ax.set_xlabel("shots (k)")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, png)
