"""The dataset report: every known dataset under a root, every problem of every pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imaml_seg.data.report import dataset_report, format_report
from tests.data.datafiles import disc, generic_tree, rgb, save


def test_report_lists_all_problems(tmp_path: Path) -> None:
    kvasir = generic_tree(tmp_path / "Kvasir-SEG", n=4)
    save(kvasir / "masks" / "case0.png", disc(5, 5))
    save(kvasir / "masks" / "case1.png", np.zeros((24, 32), np.uint8))
    save(kvasir / "images" / "extra.png", rgb())
    (tmp_path / "not-a-dataset").mkdir()
    (row,) = dataset_report(tmp_path)
    assert (row["name"], row["pairs"], row["errors"], row["warnings"]) == ("Kvasir-SEG", 4, 2, 1)
    expected = f"error: images/extra.png: image has no mask in {kvasir / 'masks'}"
    assert expected in row["problems"]
    assert any(p.startswith("error: masks/case0.png: mask is 5x5") for p in row["problems"])
    assert any(p.startswith("warning: masks/case1.png: mask is empty") for p in row["problems"])
    text = format_report([row])
    assert "Kvasir-SEG" in text and "masks/case0.png" in text
    assert format_report([]).startswith("no known dataset found")


def test_real_report(real_data_root: Path) -> None:
    rows = {row["name"]: row for row in dataset_report(real_data_root)}
    counts = {name: rows[name]["pairs"] for name in rows}
    assert counts == {"Kvasir-SEG": 1000, "CVC-ClinicDB": 612, "ISIC2018": 1297, "DRIVE": 40}
    assert all(row["errors"] == 0 for row in rows.values())
    print(format_report(list(rows.values())))
