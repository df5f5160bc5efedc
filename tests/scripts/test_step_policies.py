"""scripts/step_policies.py: a study's companions (0 steps, support CV, one-SE, paired-SE) side
by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaml_seg.config import ConfigError
from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths
from tests.scripts import load_script
from tests.test_experiment import mini_study

step_policies = load_script("step_policies")


def _companion(study: Path, suffix: str, shift: float) -> None:
    """A copy of the mini study named ``mini<suffix>`` with only its imaml unit, every draw's
    and every test image's Dice moved by ``shift``."""
    name = f"mini{suffix}"
    text = study.read_text().replace('name = "mini"', f'name = "{name}"')
    study.with_name(f"{name}.toml").write_text(text.replace('"scratch", "imaml"', '"imaml"'))
    folder = study.parents[1] / "results" / name
    folder.mkdir()
    unit = json.loads((study.parents[1] / "results" / "mini" / "imaml.json").read_text())
    for r in unit["records"]:
        r["dice"] += shift
        r["dice_per_image"] = [v + shift for v in r["dice_per_image"]]
    (folder / "imaml.json").write_text(json.dumps(unit))


def test_rows_hold_each_policys_mean_and_the_one_se_difference(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1, 2], 3)
    run_experiment(study, Paths(Path(".")), quiet=True)
    saved = json.loads((tmp_path / "results" / "mini.json").read_text())
    with pytest.raises(ConfigError, match="no companion study"):
        step_policies.policy_rows(tmp_path, "mini", [2])
    _companion(study, "_zeroshot", -0.25)
    _companion(study, "_onese", 0.125)
    rows = step_policies.policy_rows(tmp_path, "mini", [1, 2])
    # Only the companions' method; the fixed steps are the base study's own unit.
    assert [(r["method"], r["shots"]) for r in rows] == [("imaml", 1), ("imaml", 2)]
    for r in rows:
        mean = saved["summary_dice"][f"imaml@{r['shots']}"]["mean"]
        assert r["fixed"] == pytest.approx(mean)
        assert r["0 steps"] == pytest.approx(mean - 0.25)
        assert r["one-SE"] == pytest.approx(mean + 0.125)
        assert r["support CV"] is None and r["one-SE points"] is None
        assert r["paired-SE"] is None and r["paired-SE points"] is None
        assert r["0 steps points"] == pytest.approx(-25.0) and r["0 steps wins"] == 0
    _companion(study, "_supportcv", 0.0)
    _companion(study, "_pairedse", -0.0625)
    (row,) = step_policies.policy_rows(tmp_path, "mini", [2])
    assert row["one-SE points"] == pytest.approx(12.5)
    assert row["one-SE p"] == pytest.approx(0.25)  # 3 draws, all one sign: exact two-sided p
    images = len(saved["records"][0]["dice_per_image"])  # all one sign too
    assert row["one-SE p images"] == pytest.approx(2 / 2**images)
    assert row["paired-SE points"] == pytest.approx(-6.25)
    assert step_policies.main(["mini", "--root", str(tmp_path), "--shots", "2"]) == 0
    table = capsys.readouterr().out
    assert f"| mini | imaml | 2 | {row['fixed']:.3f} |" in table
    assert (f"**{row['one-SE']:.3f}** | {row['paired-SE']:.3f} | +12.5 (p = 0.25 / "
            f"{2 / 2**images:.2g}) | -6.2") in table
    assert step_policies.main(["mini", "--root", str(tmp_path), "--shots", "1",
                               "--no-fine-tuning"]) == 0
    one = capsys.readouterr().out
    fixed, zero = rows[0]["fixed"], rows[0]["0 steps"]
    assert f"| mini | imaml | 1 | **{fixed:.3f}** | {zero:.3f} | -25.0 (p" in one
    assert one.rstrip().endswith("| 0 |")
    # A retrained reference takes the place of the base study for the fixed steps.
    _companion(study, "_retrained", 0.0625)
    (row,) = step_policies.policy_rows(tmp_path, "mini", [2])
    assert row["fixed"] == pytest.approx(saved["summary_dice"]["imaml@2"]["mean"] + 0.0625)
    assert step_policies.main(["nothing", "--root", str(tmp_path)]) == 2
