"""scripts/shrink_datasets.py: the shrunk copy gives the same cache, up to JPEG re-encoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from imaml_seg.data.cache import load_arrays
from tests.data.datafiles import disc, rgb, save

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "shrink_datasets.py"


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like ``uint8 (h, w, 3)`` image: smooth gradients JPEG keeps well."""
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    c = np.random.default_rng(seed).uniform(0.2, 0.8, 3)
    return (255 * np.stack([c[0] * yy + 0.1, c[1] * xx + 0.1, c[2] * (xx + yy) / 2], -1)).astype(
        np.uint8
    )


def _data_root(root: Path, smooth_tiffs: bool = False) -> Path:
    """Kvasir-SEG (JPEG) and CVC-ClinicDB (TIFF, noise images unless ``smooth_tiffs``)."""
    for i in range(3):
        save(root / "Kvasir-SEG" / "images" / f"k{i}.jpg", _smooth(40, 48, i), quality=95)
        save(root / "Kvasir-SEG" / "masks" / f"k{i}.jpg", disc(40, 48, 8 + i), quality=95)
        cvc = root / "CVC-ClinicDB"
        (cvc / "Original").mkdir(parents=True, exist_ok=True)
        (cvc / "Ground Truth").mkdir(parents=True, exist_ok=True)
        image = _smooth(36, 44, 10 + i) if smooth_tiffs else rgb(36, 44, i)
        tifffile.imwrite(cvc / "Original" / f"{i + 1}.tif", image)
        tifffile.imwrite(cvc / "Ground Truth" / f"{i + 1}.tif", disc(36, 44, 5 + i))
    return root


def _shrink(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--data-root", str(data), "--out", str(out),
         "--resolution", "16", "--datasets", "Kvasir-SEG", "CVC-ClinicDB", *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _image_change(data: Path, tmp_path: Path, name: str) -> float:
    """Mean absolute image change of ``name``'s cache built from the copy in ``tmp_path/small``
    against the one built from ``data``, after checking names and masks are the same."""
    full = load_arrays(name, 16, data_root=data, cache_dir=tmp_path / "cache-full")
    small = load_arrays(name, 16, data_root=tmp_path / "small", cache_dir=tmp_path / "cache")
    assert small.names == full.names
    assert np.array_equal(small.masks, full.masks) and small.masks.any()
    return float(np.abs(small.images - full.images).mean())


def test_the_copy_gives_the_same_masks_and_nearly_the_same_images(tmp_path) -> None:
    data = _data_root(tmp_path / "data")
    done = _shrink(data, tmp_path / "small")
    assert done.returncode == 0, done.stderr
    assert "CVC-ClinicDB: written; largest image pixel change from re-encoding 0/255" in done.stdout
    for name, exact in (("CVC-ClinicDB", True), ("Kvasir-SEG", False)):
        change = _image_change(data, tmp_path, name)
        assert change == 0 if exact else 0 < change < 0.1, (name, change)


def test_lossless_copy_gives_the_same_cache_with_jpeg_names_kept(tmp_path) -> None:
    data = _data_root(tmp_path / "data")
    done = _shrink(data, tmp_path / "small", "--lossless")
    assert done.returncode == 0, done.stderr
    assert "Kvasir-SEG: written; largest image pixel change from re-encoding 0/255" in done.stdout
    copy = tmp_path / "small" / "Kvasir-SEG" / "images" / "k0.jpg"
    assert copy.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # PNG data under the official name
    for name in ("Kvasir-SEG", "CVC-ClinicDB"):
        assert _image_change(data, tmp_path, name) == 0, name


def test_quality_stores_every_colour_image_as_jpeg_data_and_keeps_masks_exact(tmp_path) -> None:
    data = _data_root(tmp_path / "data", smooth_tiffs=True)
    done = _shrink(data, tmp_path / "small", "--quality", "90")
    assert done.returncode == 0, done.stderr
    tif = tmp_path / "small" / "CVC-ClinicDB" / "Original" / "1.tif"
    assert tif.read_bytes()[:2] == b"\xff\xd8"  # JPEG data under the official TIFF name
    mask = tmp_path / "small" / "CVC-ClinicDB" / "Ground Truth" / "1.tif"
    assert mask.read_bytes()[:2] in (b"II", b"MM")  # masks stay lossless TIFF
    for name in ("Kvasir-SEG", "CVC-ClinicDB"):
        change = _image_change(data, tmp_path, name)
        assert 0 < change < 0.1, (name, change)


def test_lossless_with_quality_and_a_quality_out_of_range_are_refused(tmp_path) -> None:
    data = _data_root(tmp_path / "data")
    done = _shrink(data, tmp_path / "small", "--lossless", "--quality", "90")
    assert done.returncode == 2 and "exclude each other" in done.stderr
    assert not (tmp_path / "small").exists()
    done = _shrink(data, tmp_path / "small", "--quality", "500")
    assert done.returncode == 2 and "--quality 500: a JPEG quality is 1 to 100" in done.stderr
    assert not (tmp_path / "small").exists()


def test_an_existing_output_folder_is_refused_and_left_alone(tmp_path) -> None:
    data = _data_root(tmp_path / "data")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    done = _shrink(data, mine)
    assert done.returncode == 2 and f"{mine} exists" in done.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    missing = _shrink(tmp_path / "nowhere", tmp_path / "out2")
    assert missing.returncode == 1 and "error:" in missing.stderr
    assert "Traceback" not in missing.stderr
