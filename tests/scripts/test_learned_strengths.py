"""scripts/learned_strengths.py: learned proximal strengths per U-Net stage, saved and reprinted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from imaml_seg.config import ConfigError, load, merge
from imaml_seg.meta.trainer import Paths, train
from tests.scripts import load_script

learned_strengths = load_script("learned_strengths")
TINY = Path(__file__).parents[1] / "fixtures" / "tiny.toml"


def test_stage_means_are_geometric_and_skip_biases_before_a_norm() -> None:
    lam = {
        "conv_0.conv_0.conv.weight": 1.0,
        "conv_0.conv_0.conv.bias": 100.0,  # an instance norm follows: left out
        "conv_0.conv_0.adn.N.weight": 4.0,
        "final_conv.bias": 3.0,
    }
    assert learned_strengths.stage_means(lam) == pytest.approx({"conv_0": 2.0, "final_conv": 3.0})


def test_script_reads_a_finished_run_saves_and_reprints(tmp_path, capsys) -> None:
    config = merge(load(TINY), {"meta": {"meta_steps": 3, "val_every": 0, "lam_lr": 0.3}})
    runs = tmp_path / "runs" / "mini"
    train(config, Paths(runs / "imaml"), quiet=True, stop_after=2)
    unit = "mini:imaml"
    with pytest.raises(ConfigError, match="has not finished"):
        learned_strengths.unit_strengths(tmp_path, unit)
    with pytest.raises(ConfigError, match="nothing saved"):
        learned_strengths.unit_strengths(tmp_path, unit, compute=False)
    train(config, Paths(runs / "imaml"), resume=True, quiet=True)
    plain = merge(config, {"meta": {"lam_lr": 0.0}})
    train(plain, Paths(runs / "plain"), quiet=True)
    with pytest.raises(ConfigError, match="learned no proximal strengths"):
        learned_strengths.unit_strengths(tmp_path, "mini:plain")
    with pytest.raises(ConfigError, match="STUDY:METHOD"):
        learned_strengths.unit_strengths(tmp_path, "mini")

    assert learned_strengths.main([unit, "--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "results" / "mini" / "imaml.lam.json").read_text())
    assert saved["train_seed"] == 0 and saved["inner_lam"] == 2.0
    means = learned_strengths.stage_means(saved["lam"])
    assert set(means) == set(learned_strengths.STAGES)
    row = next(line for line in printed.splitlines() if line.startswith("| encoder, 1/1 |"))
    assert row.split(" | ")[1] == f"{means['conv_0']:.2f}"
    assert not math.isclose(means["conv_0"], 2.0)  # the strengths moved from inner.lam
    assert "| stage | seed 0 | mean |" in printed

    (runs / "imaml" / "checkpoint.safetensors").unlink()  # reprinted from the saved strengths
    args = learned_strengths.parser().parse_args([unit, "--root", str(tmp_path)])
    assert learned_strengths.make(args, compute=False) + "\n" == printed
