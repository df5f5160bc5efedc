"""scripts/seed_spread.py: one study retrained with several training seeds, tabulated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from imaml_seg.config import ConfigError
from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths
from tests.scripts import load_script
from tests.test_experiment import mini_study

seed_spread = load_script("seed_spread")


def retrained(study: Path, name: str, train_seed: int, shift: float) -> None:
    """A copy of ``study`` named ``name`` with ``train_seed``, its units' results copied and
    iMAML's Dice raised by ``shift`` on every draw and image (as if that run were better)."""
    root = study.parents[1]
    text = study.read_text().replace('name = "mini"', f'name = "{name}"\ntrain_seed = {train_seed}')
    study.with_name(f"{name}.toml").write_text(text)
    (root / "results" / name).mkdir()
    for method in ("imaml", "scratch"):
        result = json.loads((root / "results" / "mini" / f"{method}.json").read_text())
        if method == "imaml":
            for r in result["records"]:
                r["dice"] += shift
                r["dice_per_image"] = [v + shift for v in r["dice_per_image"]]
        (root / "results" / name / f"{method}.json").write_text(json.dumps(result))


def test_spread_over_seeds_worked_by_hand(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1, 2], 3)
    run_experiment(study, Paths(Path(".")), quiet=True)
    saved = json.loads((tmp_path / "results" / "mini.json").read_text())
    retrained(study, "mini_seed1", 1, 0.1)
    loaded = seed_spread.load(tmp_path, ["mini", "mini_seed1"])
    rows = seed_spread.method_rows(loaded, ["imaml"], [1, 2])
    rows = {(r["method"], r["shots"]): r for r in rows}
    for k in (1, 2):
        m0 = saved["summary_dice"][f"imaml@{k}"]["mean"]
        row = rows[("imaml", k)]
        assert row["per_seed"] == pytest.approx([m0, m0 + 0.1])
        assert row["mean"] == pytest.approx(m0 + 0.05)
        assert row["sd"] == pytest.approx(0.1 / math.sqrt(2))  # sample sd of two values 0.1 apart
    (pair,) = seed_spread.pair_rows(loaded, [("imaml", "scratch")], [2])
    summary = saved["summary_dice"]
    gap = 100 * (summary["imaml@2"]["mean"] - summary["scratch@2"]["mean"])
    assert pair["per_seed"] == pytest.approx([gap, gap + 10])
    assert pair["mean"] == pytest.approx(gap + 5) and pair["sd"] == pytest.approx(10 / math.sqrt(2))
    assert pair["seeds"] == 2 and pair["favour"] == (gap > 0) + (gap + 10 > 0)
    # The seed ensemble's test: each draw's Dice averaged over the two seeds (iMAML + 0.05).
    records = saved["records"]
    a = [r["dice"] + 0.05 for r in records if r["method"] == "imaml" and r["shots"] == 2]
    b = [r["dice"] for r in records if r["method"] == "scratch" and r["shots"] == 2]
    assert pair["p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    # ... and each test image's Dice averaged over the draws and the seeds.
    per_image = {
        m: np.mean([r["dice_per_image"] for r in records if r["method"] == m and r["shots"] == 2],
                   axis=0)
        for m in ("imaml", "scratch")
    }
    expected = stats.wilcoxon(per_image["imaml"] + 0.05, per_image["scratch"]).pvalue
    assert pair["p_images"] == pytest.approx(expected)
    # A method one study lacks is shown as "-" and left out of that seed's statistics.
    assert seed_spread.main(["mini", "mini_seed1", "--methods", "imaml", "prototype",
                             "--pairs", "imaml:scratch", "--shots", "2", "--root",
                             str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| prototype | 2 | - | - | - +- - |" in out and "| seed 0 | seed 1 |" in out
    assert f"| imaml - scratch | 2 | {gap:+.1f} | {gap + 10:+.1f} |" in out
    assert f"| {pair['p']:.2g} / {pair['p_images']:.2g} |" in out


def test_refuses_other_draws_a_repeated_training_seed_and_a_bad_pair(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1], 2)
    run_experiment(study, Paths(Path(".")), quiet=True)
    retrained(study, "mini_again", 0, 0.0)
    with pytest.raises(ConfigError, match="each study needs its own"):
        seed_spread.load(tmp_path, ["mini", "mini_again"])
    other = study.with_name("mini_draws.toml")
    other.write_text(study.read_text().replace('name = "mini"', 'name = "mini_draws"\nseed = 4'))
    with pytest.raises(ConfigError, match="mini_draws and mini score different draws"):
        seed_spread.load(tmp_path, ["mini", "mini_draws"])
    assert seed_spread.main(["mini", "--pairs", "imaml", "--root", str(tmp_path)]) == 2
    assert "--pairs imaml: expected A:B" in capsys.readouterr().err


def test_readme_block_is_written_in_place_and_a_missing_block_is_an_error(tmp_path) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1], 2)
    run_experiment(study, Paths(Path(".")), quiet=True)
    retrained(study, "mini_seed1", 1, 0.1)
    key = ["mini", "mini_seed1", "--pairs", "imaml:scratch", "--shots", "1"]
    args = [*key, "--root", str(tmp_path)]
    readme = tmp_path / "README.md"
    # The block is named by the arguments without --root (and --readme): the README's are
    # printed again from any checkout.
    marker = "<!-- SEEDS: " + " ".join(key) + " -->"
    readme.write_text(f"intro\n{marker}\nold table\n<!-- /SEEDS -->\nrest\n")
    assert seed_spread.main([*args, "--readme", str(readme)]) == 0
    tables = seed_spread.tables(seed_spread.parser().parse_args(args))
    assert readme.read_text() == f"intro\n{marker}\n{tables}\n<!-- /SEEDS -->\nrest\n"
    assert seed_spread.readme_blocks(readme.read_text()) == [(key, tables + "\n")]
    readme.write_text("no block\n")
    assert seed_spread.main([*args, "--readme", str(readme)]) == 2
    assert readme.read_text() == "no block\n"


def test_plus_joins_one_runs_units_scored_by_another_study(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1], 2)
    run_experiment(study, Paths(Path(".")), quiet=True)
    retrained(study, "mini_seed1", 1, 0.1)
    # mini_other: mini's run scored again (here: iMAML 0.2 higher on every draw and image).
    retrained(study, "mini_other", 0, 0.2)
    retrained(study, "mini_seed1_other", 1, 0.3)
    loaded = seed_spread.load(tmp_path, ["mini+mini_other", "mini_seed1+mini_seed1_other"])
    assert set(loaded[0][1]) == {"scratch", "imaml", "scratch@other", "imaml@other"}
    (pair,) = seed_spread.pair_rows(loaded, [("imaml@other", "imaml")], [1])
    assert pair["per_seed"] == pytest.approx([20.0, 20.0])
    assert seed_spread._rest("a_b_zeroshot", "a_b_blend_cv") == "blend_cv"
    assert seed_spread._rest("a_b", "a_b_c") == "c" and seed_spread._rest("x", "y_z") == "y_z"
    with pytest.raises(ConfigError, match="mini_seed1 has training seed 1, mini 0; '\\+' joins"):
        seed_spread.load(tmp_path, ["mini+mini_seed1"])
