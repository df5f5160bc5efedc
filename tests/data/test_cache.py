"""Preprocessing and the array cache: stretch, normalise, cache, invalidate, never touch data."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from imaml_seg.data import cache
from imaml_seg.data.cache import (
    SegArrays,
    cache_dir_from,
    load_arrays,
    normalise,
    preprocess,
)
from imaml_seg.data.validate import DataError, load_image, load_mask
from tests.data.datafiles import disc, generic_tree, rgb, save


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the per-pair decoder that builds the cache."""
    calls = [0]
    real = cache.check_pair

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "check_pair", counting)
    return calls


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_shapes_and_normalisation() -> None:
    image, mask = preprocess(rgb(30, 40), disc(30, 40, 8) > 0, 16)
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    assert mask.shape == (1, 16, 16) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_allclose(image.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(image.std(axis=(1, 2)), 1, atol=1e-4)


def test_preprocess_stretches_without_padding() -> None:
    """A mask covering the left half of a 4:3 image covers the left half of the square."""
    mask = np.zeros((30, 40), bool)
    mask[:, :20] = True
    _, small = preprocess(rgb(30, 40), mask, 16)
    assert small[0, :, :8].all() and not small[0, :, 8:].any()


def test_nearest_keeps_thin_lines() -> None:
    """A 1-px line in a 256 px mask survives shrinking to 32 px (area + 0.5 would delete it)."""
    mask = np.zeros((256, 256), bool)
    mask[:, 100] = True
    _, small = preprocess(rgb(256, 256), mask, 32)
    assert small.sum() >= 16


def test_normalise_matches_formula() -> None:
    x = np.random.default_rng(0).random((2, 3, 8, 8))
    expected = (x - x.mean(axis=(2, 3), keepdims=True)) / (x.std(axis=(2, 3), keepdims=True) + 1e-6)
    np.testing.assert_allclose(normalise(x), expected, atol=1e-5)
    as_bytes = np.round(x * 255).astype(np.uint8)
    np.testing.assert_allclose(normalise(as_bytes), normalise(as_bytes / 255.0), atol=1e-4)
    assert np.all(normalise(np.full((3, 4, 4), 0.5)) == 0)  # flat image: no division blow-up


def test_segarrays_checks_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        SegArrays(np.zeros((2, 3, 8, 8), np.float32), np.zeros((2, 1, 4, 4), np.float32),
                  ("a", "b"), "x")


def test_cache_dir_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAML_SEG_CACHE", raising=False)
    assert cache_dir_from(None) == Path.home() / ".cache" / "imaml-seg"
    monkeypatch.setenv("IMAML_SEG_CACHE", str(tmp_path))
    assert cache_dir_from(None) == tmp_path
    assert cache_dir_from(str(tmp_path / "x")) == tmp_path / "x"


# ----------------------------------------------------------------------------- caching


def test_second_load_is_from_cache(generic: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    before = _files(generic)
    first = load_arrays(str(generic), 32, data_root=None, cache_dir=tmp_path / "cache")
    assert calls[0] == 6 and first.name == "toy" and first.images.shape == (6, 3, 32, 32)
    assert first.names == tuple(f"case{i}" for i in range(6))
    second = load_arrays(str(generic), 32, data_root=None, cache_dir=tmp_path / "cache")
    assert calls[0] == 6  # nothing decoded the second time
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.names == second.names
    assert _files(generic) == before  # nothing written next to the dataset
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]


def test_cached_equals_preprocess(generic: Path, tmp_path: Path) -> None:
    arrays = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "cache")
    image, mask = preprocess(load_image(generic / "images" / "case2.png"),
                             load_mask(generic / "masks" / "case2.png"), 16)
    np.testing.assert_allclose(arrays.images[2], image, atol=1e-5)
    np.testing.assert_array_equal(arrays.masks[2], mask)


def test_touching_a_file_invalidates(generic: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    mask = generic / "masks" / "case1.png"
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    assert calls[0] == 12


def test_modifying_a_file_changes_the_arrays(generic: Path, tmp_path: Path) -> None:
    first = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    save(generic / "masks" / "case0.png", np.zeros((24, 32), np.uint8))
    second = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    assert first.masks[0].any() and not second.masks[0].any()
    np.testing.assert_array_equal(first.masks[1:], second.masks[1:])


def test_a_rebuilt_cache_replaces_the_stale_one_of_the_same_folder(
    generic: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "c"
    load_arrays(str(generic), 16, data_root=None, cache_dir=cache_dir)
    load_arrays(str(generic), 32, data_root=None, cache_dir=cache_dir)
    twin = generic_tree(tmp_path / "elsewhere" / "toy")  # another folder with the same name
    load_arrays(str(twin), 16, data_root=None, cache_dir=cache_dir)
    legacy = cache_dir / "toy-16px-0123456789abcdef.npz"  # written before caches named their source
    np.savez(legacy, images=np.zeros((1, 3, 16, 16), np.uint8))
    before = {p.name for p in cache_dir.iterdir()}
    assert len(before) == 4
    mask = generic / "masks" / "case1.png"
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_arrays(str(generic), 16, data_root=None, cache_dir=cache_dir)
    after = {p.name for p in cache_dir.iterdir()}
    removed, added = before - after, after - before
    assert len(removed) == 1 and len(added) == 1
    (gone,) = removed
    assert gone.startswith("toy-16px-") and gone != legacy.name
    # the 32 px arrays, the twin folder's arrays and the legacy file are all kept
    assert {n for n in after if n.startswith("toy-32px-")} and legacy.name in after
    assert len(load_arrays(str(twin), 16, data_root=None, cache_dir=cache_dir)) == 6
    assert {p.name for p in cache_dir.iterdir()} == after  # the twin's cache was still valid


def test_adding_a_pair_invalidates(generic: Path, tmp_path: Path) -> None:
    load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    save(generic / "images" / "new.png", rgb())
    save(generic / "masks" / "new.png", disc())
    assert len(load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")) == 7


def test_cache_dir_from_env(generic: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAML_SEG_CACHE", str(tmp_path / "env-cache"))
    load_arrays(str(generic), 16, data_root=None, cache_dir=None)
    assert len(list((tmp_path / "env-cache").glob("toy-16px-*.npz"))) == 1


def test_corrupt_cache_file_is_rebuilt(generic: Path, tmp_path: Path) -> None:
    first = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    (path,) = (tmp_path / "c").iterdir()
    path.write_bytes(b"garbage")
    again = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(first.images, again.images)
    assert path.stat().st_size > 100


def test_cache_inside_dataset_refused(generic: Path) -> None:
    with pytest.raises(DataError, match="inside the dataset"):
        load_arrays(str(generic), 16, data_root=None, cache_dir=generic / "cache")
    assert not (generic / "cache").exists()


def test_errors_are_listed_and_nothing_cached(generic: Path, tmp_path: Path) -> None:
    save(generic / "masks" / "case0.png", disc(10, 10))  # wrong size
    (generic / "images" / "case1.png").write_bytes(b"junk")  # unreadable
    save(generic / "images" / "orphan.png", rgb())  # no mask
    for i in range(2, 6):
        grey = disc().copy()
        grey[:] = 120
        save(generic / "masks" / f"case{i}.png", grey)  # not binary
    with pytest.raises(DataError) as err:
        load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    message = str(err.value)
    assert message.startswith("7 data error(s) in ") and "\n" not in message
    assert "orphan.png: image has no mask" in message
    assert "and 2 more" in message
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_empty_masks_are_kept(generic: Path, tmp_path: Path) -> None:
    save(generic / "masks" / "case3.png", np.zeros((24, 32), np.uint8))
    arrays = load_arrays(str(generic), 16, data_root=None, cache_dir=tmp_path / "c")
    assert len(arrays) == 6 and not arrays.masks[3].any()


def test_synthetic_spec(tmp_path: Path) -> None:
    arrays = load_arrays("synthetic:2", 32, data_root=None, cache_dir=tmp_path / "c")
    assert arrays.name == "synthetic:2" and arrays.images.shape == (64, 3, 32, 32)
    assert len(load_arrays("synthetic:2:10", 32, data_root=None, cache_dir=None)) == 10
    assert not (tmp_path / "c").exists()
    with pytest.raises(DataError, match="synthetic:9"):
        load_arrays("synthetic:9", 32, data_root=None, cache_dir=None)


def test_real_drive_cache(real_dataset: Callable[[str], Path], tmp_path: Path) -> None:
    folder = real_dataset("DRIVE")
    before = _files(folder)
    start = time.perf_counter()
    cold = load_arrays("DRIVE", 32, data_root=folder.parent, cache_dir=tmp_path)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    warm = load_arrays("DRIVE", 32, data_root=folder.parent, cache_dir=tmp_path)
    warm_s = time.perf_counter() - start
    assert cold.images.shape == (40, 3, 32, 32) and cold.name == "DRIVE"
    np.testing.assert_array_equal(cold.images, warm.images)
    assert set(np.unique(warm.masks)) == {0.0, 1.0}
    assert all(m.any() for m in warm.masks)
    assert warm_s < max(0.5, cold_s / 3)
    assert _files(folder) == before


def test_real_generic_copy(real_dataset: Callable[[str], Path], tmp_path: Path) -> None:
    """A few Kvasir-SEG JPEG pairs copied into a generic folder load like the original."""
    source = real_dataset("Kvasir-SEG")
    names = sorted(p.name for p in (source / "images").iterdir())[:4]
    for sub in ("images", "masks"):
        (tmp_path / "few" / sub).mkdir(parents=True)
        for name in names:
            (tmp_path / "few" / sub / name).write_bytes((source / sub / name).read_bytes())
    arrays = load_arrays(str(tmp_path / "few"), 64, data_root=None, cache_dir=tmp_path / "c")
    assert arrays.images.shape == (4, 3, 64, 64) and arrays.masks.any(axis=(1, 2, 3)).all()
    image, mask = preprocess(load_image(tmp_path / "few" / "images" / names[1]),
                             load_mask(tmp_path / "few" / "masks" / names[1]), 64)
    np.testing.assert_allclose(arrays.images[1], image, atol=1e-5)  # what prediction will see
    np.testing.assert_array_equal(arrays.masks[1], mask)


def test_cache_file_works_as_a_dataset_without_the_raw_files(tmp_path) -> None:
    from imaml_seg.data.cache import load_arrays
    from imaml_seg.data.validate import DataError
    from tests.data.datafiles import generic_tree

    folder = generic_tree(tmp_path / "mine", n=4)
    original = load_arrays(str(folder), 32, data_root=None, cache_dir=tmp_path / "cache")
    (npz,) = (tmp_path / "cache").glob("*.npz")
    moved = tmp_path / "elsewhere" / npz.name
    moved.parent.mkdir()
    npz.rename(moved)
    again = load_arrays(str(moved), 32, data_root=None, cache_dir=None)
    assert again.name == original.name and again.names == original.names
    assert (again.images == original.images).all() and (again.masks == original.masks).all()
    with pytest.raises(DataError, match="preprocessed at 32 px, the run asks for 64 px"):
        load_arrays(str(moved), 64, data_root=None, cache_dir=None)
    odd = tmp_path / "arrays.npz"
    odd.write_bytes(b"x")
    with pytest.raises(DataError, match="arrays.npz: not an imaml-seg array file"):
        load_arrays(str(odd), 32, data_root=None, cache_dir=None)
