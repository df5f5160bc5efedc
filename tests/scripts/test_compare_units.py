"""scripts/compare_units.py: units of two studies compared on their shared draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from imaml_seg.config import ConfigError
from imaml_seg.experiment import Study, run_experiment
from imaml_seg.meta.trainer import Paths
from tests.scripts import load_script
from tests.test_experiment import mini_study

compare_units = load_script("compare_units")


def test_compare_matches_the_studys_own_test_and_refuses_other_draws(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1, 2], 3)
    run_experiment(study, Paths(Path(".")), quiet=True)
    saved = json.loads((tmp_path / "results" / "mini.json").read_text())
    # The copy of a study with its own name: the same draws, so the same test as the report's.
    copy = study.with_name("mini_copy.toml")
    copy.write_text(study.read_text().replace('name = "mini"', 'name = "mini_copy"'))
    (tmp_path / "results" / "mini_copy").mkdir()
    for name in ("imaml.json", "scratch.json"):
        (tmp_path / "results" / "mini_copy" / name).write_text(
            (tmp_path / "results" / "mini" / name).read_text()
        )
    rows = compare_units.compare(tmp_path, "mini_copy:imaml", "mini:scratch", [1, 2])
    for row in rows:
        k = row["shots"]
        assert row["draws"] == 3
        assert row["a"] == pytest.approx(saved["summary_dice"][f"imaml@{k}"]["mean"])
        assert row["b"] == pytest.approx(saved["summary_dice"][f"scratch@{k}"]["mean"])
        assert row["points"] == pytest.approx(100 * (row["a"] - row["b"]))
        assert row["p"] == saved["wilcoxon_p"].get(f"imaml_vs_scratch@{k}")
        dice = {(r["method"], r["draw"]): r["dice"] for r in saved["records"] if r["shots"] == k}
        assert row["a_higher"] == sum(dice[("imaml", d)] > dice[("scratch", d)] for d in range(3))
        images = {m: np.mean([r["dice_per_image"] for r in saved["records"]
                              if r["shots"] == k and r["method"] == m], axis=0)
                  for m in ("imaml", "scratch")}
        assert row["p_images"] == pytest.approx(
            stats.wilcoxon(images["imaml"], images["scratch"]).pvalue)
    # A unit against itself: no difference, so neither test has a p-value.
    (same,) = compare_units.compare(tmp_path, "mini_copy:imaml", "mini:imaml", [2])
    assert same["points"] == 0 and same["p"] is None and same["p_images"] is None
    args = ["mini_copy:imaml", "mini:scratch", "--root", str(tmp_path), "--shots", "1", "2"]
    assert compare_units.main(args) == 0
    assert "| 2 | 3 |" in capsys.readouterr().out
    # Another seed draws other support sets: refused, naming both studies.
    other = study.with_name("mini_seed.toml")
    other.write_text(study.read_text().replace('name = "mini"', 'name = "mini_seed"\nseed = 5'))
    with pytest.raises(ConfigError, match="mini_seed and mini score different draws"):
        compare_units.compare(tmp_path, "mini_seed:imaml", "mini:scratch", [1])
    # Another training seed retrains on other tasks and scores the same draws: accepted.
    retrain = study.with_name("mini_train1.toml")
    text = study.read_text().replace('name = "mini"', 'name = "mini_train1"\ntrain_seed = 1')
    retrain.write_text(text)
    trained = Study.from_file(retrain)
    assert trained.config.training_seed == 1 and trained.config.seed == 0
    assert trained.draw_settings() == Study.from_file(study).draw_settings()
    assert compare_units.main(["mini:nothing", "mini:scratch", "--root", str(tmp_path)]) == 2
    assert "no finished unit nothing" in capsys.readouterr().err
