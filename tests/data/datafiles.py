"""Small image files and dataset trees written by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save(path: Path, pixels: np.ndarray | Image.Image, **kwargs) -> Path:
    """Write ``pixels`` (array or Pillow image) to ``path``, creating folders; format by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path, **kwargs)
    return path


def rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    """A random ``uint8 (h, w, 3)`` image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def disc(h: int = 24, w: int = 32, radius: float = 6.0) -> np.ndarray:
    """A ``uint8 (h, w)`` mask, 255 inside a centred disc and 0 elsewhere."""
    yy, xx = np.mgrid[:h, :w]
    return np.where(np.hypot(yy - h / 2, xx - w / 2) <= radius, 255, 0).astype(np.uint8)


def generic_tree(root: Path, n: int = 6, h: int = 24, w: int = 32) -> Path:
    """``root/images/case<i>.png`` + ``root/masks/case<i>.png`` (discs of different sizes)."""
    for i in range(n):
        save(root / "images" / f"case{i}.png", rgb(h, w, seed=i))
        save(root / "masks" / f"case{i}.png", disc(h, w, radius=3 + i % 5))
    return root
