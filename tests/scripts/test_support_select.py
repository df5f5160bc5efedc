"""scripts/support_select.py: a starting point chosen per draw by its Dice on the support set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imaml_seg.config import ConfigError
from imaml_seg.data.cache import load_arrays
from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths
from tests.scripts import load_script
from tests.test_experiment import mini_study

support_select = load_script("support_select")


def record(method: str, draw: int, value: float) -> dict:
    return {"method": method, "shots": 2, "draw": draw, "dice": value,
            "dice_per_image": [value, value / 2]}


def test_select_keeps_the_record_of_the_best_support_score_first_among_ties() -> None:
    a = [record("transfer", 0, 0.5), record("transfer", 1, 0.6), record("transfer", 2, 0.7)]
    b = [record("imaml", 0, 0.9), record("imaml", 1, 0.1), record("imaml", 2, 0.2)]
    scores = {(2, 0): [0.3, 0.8], (2, 1): [0.4, 0.4], (2, 2): [0.9, 0.1]}
    out = support_select.select([a, b], scores)
    policy = {r["draw"]: r for r in out if r["method"] == support_select.POLICY}
    assert [policy[d]["chosen"] for d in range(3)] == [1, 0, 0]
    assert [policy[d]["dice"] for d in range(3)] == [0.9, 0.6, 0.7]
    assert policy[0]["dice_per_image"] == [0.9, 0.45]
    assert {r["method"] for r in out} == {"c0", "c1", support_select.POLICY}
    with pytest.raises(ConfigError, match="no record of 2-shot draw 3"):
        support_select.select([a, b], {(2, 3): [1.0, 0.0]})


def test_script_scores_zero_shot_units_and_refuses_fine_tuned_ones(tmp_path, capsys) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1, 2], 3)
    spec.write_text(spec.read_text().replace("draws = 3 }", "draws = 3, inner_steps = 0 }"))
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    units = ["mini:transfer", "mini:imaml_warm"]
    candidates = support_select.load_candidates(tmp_path, units)
    config = candidates[0][0].config

    def load_target():
        return load_arrays(config.target, config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    with pytest.raises(ConfigError, match="support.json: nothing saved for"):
        support_select.support_scores(tmp_path, candidates, [1, 2])
    scores = support_select.support_scores(tmp_path, candidates, [1, 2], load_target)
    assert set(scores) == {(k, d) for k in (1, 2) for d in range(3)}
    assert all(len(s) == 2 and all(0 <= v <= 1 for v in s) for s in scores.values())
    # Saved beside each unit's result: printed again without weights or images.
    assert (tmp_path / "results" / "mini" / "imaml_warm.support.json").is_file()
    shutil.rmtree(tmp_path / "runs")
    assert support_select.support_scores(tmp_path, candidates, [1, 2]) == scores
    records = support_select.select([c[2]["records"] for c in candidates], scores)
    saved = {(r["method"], r["shots"], r["draw"]): r["dice"] for r in records}
    for r in (r for r in records if r["method"] == support_select.POLICY):
        assert r["dice"] == saved[(f"c{r['chosen']}", r["shots"], r["draw"])]
    assert support_select.main([*units, "--root", str(tmp_path), "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | mini:imaml_warm |" in out and "chosen on the support set" in out
    # A unit that fine-tunes on its shots has seen them: its support Dice is not held out.
    tuned = spec.with_name("mini_tuned.toml")
    tuned.write_text(spec.read_text().replace('name = "mini"', 'name = "mini_tuned"')
                     .replace(", inner_steps = 0", ""))
    results = tmp_path / "results" / "mini_tuned"
    results.mkdir(parents=True)
    payload = json.loads((tmp_path / "results" / "mini" / "transfer.json").read_text())
    (results / "transfer.json").write_text(json.dumps({**payload, "eval": {"inner_steps": 5}}))
    assert support_select.main(["mini:transfer", "mini_tuned:transfer", "--root",
                                str(tmp_path)]) == 2
    assert "has no held-out score on it" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="reads its support set as an input"):
        support_select.load_candidates(tmp_path, ["mini:transfer", "mini:prototype"])
    # 10 shots were never scored, and the weights are gone: refused, naming what is missing.
    assert support_select.main([*units, "--root", str(tmp_path), "--shots", "10"]) == 2
    assert "no weights under" in capsys.readouterr().err



def test_support_cv_units_compete_by_their_best_held_out_dice(tmp_path, capsys) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1, 2], 3)
    spec.write_text(spec.read_text().replace("draws = 3 }", "draws = 3, inner_steps = 0 }"))
    cv = spec.with_name("mini_cv.toml")
    cv.write_text(spec.read_text().replace('name = "mini"', 'name = "mini_cv"\ntrain_from = "mini"')
                  .replace("inner_steps = 0 }", "inner_steps = 3, support_cv = true }"))
    for study in (spec, cv):
        run_experiment(study, Paths(Path(".")), quiet=True, figures=False)
    candidates = support_select.load_candidates(tmp_path, ["mini:transfer", "mini_cv:transfer",
                                                           "mini_cv:imaml_warm"])
    config = candidates[0][0].config

    def load_target():
        return load_arrays(config.target, config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    scores = support_select.support_scores(tmp_path, candidates, [2], load_target)
    records = json.loads((tmp_path / "results" / "mini_cv" / "transfer.json").read_text())
    for r in (r for r in records["records"] if r["shots"] == 2):
        zero_shot, best_cv, _ = scores[(2, r["draw"])]
        assert best_cv == max(r["cv_dice"].values())
        # Held out fold by fold, the weights as they are score their support Dice.
        assert r["cv_dice"]["0"] == pytest.approx(zero_shot, abs=1e-5)
    with pytest.raises(ConfigError, match=r"mini_cv:transfer: no score of \(shots:draw\)"):
        support_select.support_scores(tmp_path, candidates[1:2], [4])
    # One shot cannot be split: support CV has no held-out score for it.
    with pytest.raises(ConfigError, match="no held-out Dice recorded for 1-shot draws"):
        support_select.support_scores(tmp_path, candidates, [1], load_target)
    one_se = cv.with_name("mini_onese.toml")
    rule = 'support_cv = true, support_cv_rule = "one_se"'
    one_se.write_text(cv.read_text().replace('name = "mini_cv"', 'name = "mini_onese"')
                      .replace("support_cv = true", rule))
    (tmp_path / "results" / "mini_onese").mkdir()
    payload = json.loads((tmp_path / "results" / "mini_cv" / "transfer.json").read_text())
    payload["eval"]["support_cv_rule"] = "one_se"
    (tmp_path / "results" / "mini_onese" / "transfer.json").write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match="has no held-out score on it"):
        support_select.load_candidates(tmp_path, ["mini:transfer", "mini_onese:transfer"])
