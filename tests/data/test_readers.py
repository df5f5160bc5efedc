"""Readers: every official layout on the real data, the others on small fake trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imaml_seg.data.readers import (
    KNOWN_DATASETS,
    Pair,
    data_root_from,
    detect_layout,
    find_datasets,
    natural_key,
    read_busi,
    read_dataset,
    read_generic,
    read_ph2,
    resolve_dataset,
)
from imaml_seg.data.validate import DataError, check_pair, load_image, load_mask
from tests.data.datafiles import disc, generic_tree, rgb, save

REAL_COUNTS = {"Kvasir-SEG": 1000, "CVC-ClinicDB": 612, "ISIC2018": 1297, "DRIVE": 40}

# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_real_dataset(name: str, real_dataset: Callable[[str], Path]) -> None:
    folder = real_dataset(name)
    pairs, problems = read_dataset(name, folder.parent)
    assert problems == []
    assert len(pairs) == REAL_COUNTS[name]
    assert len({p.image.stem for p in pairs}) == len(pairs)
    assert pairs == sorted(pairs, key=lambda p: natural_key(p.image.as_posix()))
    for pair in (pairs[0], pairs[len(pairs) // 2], pairs[-1]):
        image, mask = load_image(pair.image), load_mask(pair.mask)
        assert image.shape[:2] == mask.shape and image.shape[2] == 3
        assert mask.dtype == np.bool_ and mask.any() and not mask.all()


def test_real_cvc_natural_order(real_dataset: Callable[[str], Path]) -> None:
    pairs, _ = read_dataset("CVC-ClinicDB", real_dataset("CVC-ClinicDB").parent)
    assert [p.image.stem for p in pairs[:3]] == ["1", "2", "3"]


def test_real_drive_has_fov_and_both_splits(real_dataset: Callable[[str], Path]) -> None:
    pairs, _ = read_dataset("DRIVE", real_dataset("DRIVE").parent)
    assert all(p.fov is not None and p.fov.is_file() for p in pairs)
    assert {p.image.parent.parent.name for p in pairs} == {"training", "test"}
    assert all(p.mask.name.endswith("_manual1.gif") for p in pairs)


def test_real_find_datasets(real_data_root: Path) -> None:
    found = find_datasets(real_data_root)
    assert set(REAL_COUNTS) <= set(found)


def test_real_folder_path_detects_layout(real_dataset: Callable[[str], Path]) -> None:
    for name in REAL_COUNTS:
        resolved, folder, reader = resolve_dataset(str(real_dataset(name)), None)
        assert (resolved, reader) == (name, KNOWN_DATASETS[name])


def test_dataset_not_found_lists_what_is_there(real_data_root: Path) -> None:
    with pytest.raises(DataError, match="PH2 not found .*found: .*Kvasir-SEG"):
        read_dataset("PH2", real_data_root)


# ----------------------------------------------------------------------------- roots, specs


def test_data_root_needed_for_a_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="IMAML_SEG_DATA"):
        read_dataset("Kvasir-SEG", None)
    with pytest.raises(DataError, match="nowhere: data root does not exist"):
        read_dataset("Kvasir-SEG", tmp_path / "nowhere")


def test_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'Nope'"):
        read_dataset("Nope", tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder is empty"):
        read_dataset(str(tmp_path / "empty"), None)


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "toy" / "images").mkdir(parents=True)
    (tmp_path / "toy" / "masks").mkdir()
    with pytest.raises(DataError, match="toy: no image/mask pairs found .*no images found"):
        read_dataset(str(tmp_path / "toy"), None)


def test_folder_without_layout(tmp_path: Path) -> None:
    save(tmp_path / "stuff" / "a.png", rgb())
    with pytest.raises(DataError, match="stuff: no dataset layout found"):
        read_dataset(str(tmp_path / "stuff"), None)


def test_data_root_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAML_SEG_DATA", raising=False)
    assert data_root_from(None) is None
    monkeypatch.setenv("IMAML_SEG_DATA", str(tmp_path))
    assert data_root_from(None) == tmp_path
    assert data_root_from("/x") == Path("/x")


def test_find_datasets_aliases(tmp_path: Path) -> None:
    for folder in ("kvasir-seg", "PH2Dataset", "Dataset_BUSI_with_GT", "unrelated"):
        (tmp_path / folder).mkdir()
    found = find_datasets(tmp_path)
    assert found == {"Kvasir-SEG": tmp_path / "kvasir-seg", "PH2": tmp_path / "PH2Dataset",
                     "BUSI": tmp_path / "Dataset_BUSI_with_GT"}
    assert find_datasets(tmp_path / "missing") == {}


# ----------------------------------------------------------------------------- generic


def test_generic_matches_stems_and_suffixes(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    save(root / "images" / "a.png", rgb())
    save(root / "images" / "b.JPG", rgb())
    save(root / "images" / "c.tif", rgb())
    save(root / "images" / "d.bmp", rgb())
    save(root / "masks" / "a.gif", disc())
    save(root / "masks" / "b_mask.png", disc())
    save(root / "masks" / "c_segmentation.PNG", disc())
    (root / "images" / "notes.txt").write_text("ignored")
    save(root / "masks" / "zz.png", disc())
    pairs, problems = read_generic(root)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        ("a.png", "a.gif"), ("b.JPG", "b_mask.png"), ("c.tif", "c_segmentation.PNG")]
    assert sorted((Path(p.path).name, p.severity) for p in problems) == [
        ("d.bmp", "error"), ("zz.png", "error")]
    messages = {Path(p.path).name: p.message for p in problems}
    assert "image has no mask" in messages["d.bmp"] and "mask has no image" in messages["zz.png"]


def test_generic_natural_sort_and_duplicates(tmp_path: Path) -> None:
    root = generic_tree(tmp_path / "toy", n=12)
    save(root / "images" / "case3.jpg", rgb())
    pairs, problems = read_generic(root)
    assert [p.image.stem for p in pairs] == [f"case{i}" for i in range(12)]
    assert len(problems) == 1 and "same name" in problems[0].message


def test_read_dataset_by_folder_uses_folder_name(tmp_path: Path) -> None:
    generic_tree(tmp_path / "toy")
    name, folder, reader = resolve_dataset(str(tmp_path / "toy"), None)
    assert (name, folder, reader) == ("toy", tmp_path / "toy", read_generic)
    assert resolve_dataset("toy", tmp_path)[0] == "toy"  # relative to the data root
    pairs, problems = read_dataset(str(tmp_path / "toy"), None)
    assert len(pairs) == 6 and problems == []


# ----------------------------------------------------------------------------- PH2


def _ph2_tree(base: Path, cases: int = 3, skip_lesion: int | None = None) -> Path:
    images = base / "PH2Dataset" / "PH2 Dataset images"
    for i in range(1, cases + 1):
        name = f"IMD{i:03d}"
        save(images / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", rgb(20, 24, seed=i))
        if i != skip_lesion:
            lesion = Image.fromarray(disc(20, 24, 5) > 0).convert("1")  # 1-bit, as published
            save(images / name / f"{name}_lesion" / f"{name}_lesion.bmp", lesion)
        (images / name / f"{name}_roi").mkdir()
    return base / "PH2Dataset"


def test_ph2(tmp_path: Path) -> None:
    root = _ph2_tree(tmp_path, cases=3, skip_lesion=2)
    for given in (root, root.parent, root / "PH2 Dataset images"):
        pairs, problems = read_ph2(given)
        assert [p.image.stem for p in pairs] == ["IMD001", "IMD003"]
        assert len(problems) == 1 and problems[0].path.endswith("IMD002.bmp")
        assert "image has no mask" in problems[0].message
    mask = load_mask(pairs[0].mask)
    assert Image.open(pairs[0].mask).mode == "1"
    np.testing.assert_array_equal(mask, disc(20, 24, 5) > 0)
    assert detect_layout(root) == "PH2"
    assert find_datasets(tmp_path) == {"PH2": root}
    assert read_dataset("PH2", tmp_path)[0] == pairs


# ----------------------------------------------------------------------------- BUSI


def test_busi_unites_masks(tmp_path: Path) -> None:
    base = tmp_path / "Dataset_BUSI_with_GT"
    left, right = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    left[2:6, 2:6], right[9:14, 9:14] = 255, 255
    save(base / "benign" / "benign (1).png", rgb(16, 16))
    save(base / "benign" / "benign (1)_mask.png", left)
    save(base / "benign" / "benign (1)_mask_1.png", right)
    save(base / "benign" / "benign (2).png", rgb(16, 16))
    save(base / "benign" / "benign (2)_mask.png", left)
    save(base / "malignant" / "malignant (1).png", rgb(16, 16))
    save(base / "malignant" / "malignant (7)_mask.png", left)
    save(base / "normal" / "normal (1).png", rgb(16, 16))
    save(base / "normal" / "normal (1)_mask.png", np.zeros((16, 16), np.uint8))

    for given in (base, tmp_path):
        pairs, problems = read_busi(given)
        assert [p.image.stem for p in pairs] == ["benign (1)", "benign (2)", "normal (1)"]
        assert pairs[0].extra_masks == (base / "benign" / "benign (1)_mask_1.png",)
        assert sorted(Path(p.path).name for p in problems) == [
            "malignant (1).png", "malignant (7)_mask.png"]
    checked = check_pair(pairs[0].image, pairs[0].masks)
    assert checked.mask is not None
    np.testing.assert_array_equal(checked.mask, (left > 0) | (right > 0))
    normal = check_pair(pairs[2].image, pairs[2].masks)
    assert normal.ok and [p.severity for p in normal.problems] == ["warning"]
    assert detect_layout(tmp_path) == "BUSI"
    assert find_datasets(tmp_path) == {"BUSI": base}


def test_pair_masks_property() -> None:
    pair = Pair(Path("i.png"), Path("m.png"), extra_masks=(Path("m_1.png"),))
    assert pair.masks == (Path("m.png"), Path("m_1.png"))
