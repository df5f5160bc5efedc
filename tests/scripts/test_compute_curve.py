"""scripts/compute_curve.py: Dice against training CPU time, worked by hand on written results."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from imaml_seg.config import ConfigError
from tests.scripts import load_script
from tests.test_experiment import TINY

compute_curve = load_script("compute_curve")


def study(root: Path, name: str, seed: int, methods: list[str], steps: int,
          extend_from: str | None = None) -> None:
    """``experiments/<name>.toml``: the tiny preset, ``train_seed``, ``steps`` of pretraining."""
    lines = [f'name = "{name}"', f'preset = "{TINY}"', f"train_seed = {seed}",
             f"methods = {json.dumps(methods)}"]
    if extend_from:
        lines.append(f'extend_from = "{extend_from}"')
    lines += ["[overrides.meta]", f"pretrain_steps = {steps}"]
    (root / "experiments").mkdir(exist_ok=True)
    (root / "experiments" / f"{name}.toml").write_text("\n".join(lines) + "\n")


def result(root: Path, name: str, method: str, step_seconds: list[float],
           dice: list[float]) -> None:
    """``results/<name>/<method>.json``: a training log and 2-shot draws with these Dice."""
    log = [{"step": i + 1, "seconds": s} for i, s in enumerate(step_seconds)]
    records = [{"shots": 2, "draw": d, "dice": v} for d, v in enumerate(dice)]
    records.append({"shots": 1, "draw": 0, "dice": 0.0})  # another shot count: left out
    folder = root / "results" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{method}.json").write_text(json.dumps({"train_log": log, "records": records}))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two training seeds of a chain: transfer (3 steps) and warm iMAML from it in ``w``; warm
    iMAML continued in ``w_more``, whose warm start is up its extend_from chain."""
    for seed, name in ((0, "w"), (1, "w_seed1")):
        study(tmp_path, name, seed, ["transfer", "imaml_warm"], 3)
        study(tmp_path, f"{name}_more", seed, ["imaml_warm"], 3, extend_from=name)
    result(tmp_path, "w", "transfer", [60, 60, 60], [0.5, 0.7])  # 3 min, 0.6
    result(tmp_path, "w_seed1", "transfer", [120, 120, 120], [0.7, 0.9])  # 6 min, 0.8
    result(tmp_path, "w", "imaml_warm", [120], [0.6, 0.6])  # 2 + 3 min, 0.6
    result(tmp_path, "w_seed1", "imaml_warm", [60], [0.8, 1.0])  # 1 + 6 min, 0.9
    result(tmp_path, "w_more", "imaml_warm", [120, 120], [0.7, 0.7])  # 4 + 3 min
    result(tmp_path, "w_seed1_more", "imaml_warm", [60, 60], [0.9, 0.9])  # 2 + 6 min
    return tmp_path


def args(root: Path, *extra: str) -> list[str]:
    return ["--seeds", "0", "1", "--shots", "2", "--root", str(root),
            "--series", "transfer", "w{_seed}:transfer",
            "--series", "warm", "w{_seed}:imaml_warm", "w{_seed}_more:imaml_warm", *extra]


def test_minutes_and_dice_worked_by_hand(tree: Path, capsys) -> None:
    rows = compute_curve.series_rows(compute_curve.parser().parse_args(args(tree)))
    assert [r["series"] for r in rows] == ["transfer", "warm", "warm"]
    got = [[r["minutes"], r["dice"], r["sd"]] for r in rows]
    want = [[4.5, 0.7, 0.2 / 2 ** 0.5],  # seeds 0.6 and 0.8: their sample sd
            [6.0, 0.75, 0.3 / 2 ** 0.5],  # 2 + 3 and 1 + 6 minutes with the warm start
            [7.5, 0.8, 0.2 / 2 ** 0.5]]  # its warm start found up the extend_from chain
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)
    assert compute_curve.main(args(tree)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| recipe | unit (training seed {seed}: 0, 1) |")
    assert lines[3] == "| warm | `w{_seed}:imaml_warm` | 6.0 | 0.750 +- 0.212 |"


def test_readme_block_and_figure(tree: Path, capsys) -> None:
    readme = tree / "README.md"
    own = args(tree)
    own_block = [a for a in own if a not in ("--root", str(tree))]
    readme.write_text(f"x\n<!-- COMPUTE: {shlex.join(own_block)} -->\nold\n<!-- /COMPUTE -->\ny\n")
    assert compute_curve.main([*own, "--readme", str(readme)]) == 0
    ((block_args, block),) = compute_curve.readme_blocks(readme.read_text())
    assert block_args == own_block and block.startswith("| recipe |") and "0.750 +- 0.212" in block
    png = tree / "figures" / "curve.png"
    assert compute_curve.main([*own, "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert compute_curve.main([*own, "--png", str(png), "--readme", str(readme)]) == 2
    assert "run once with each" in capsys.readouterr().err


def test_bad_input_is_named(tree: Path, capsys) -> None:
    def fails(*extra: str) -> str:
        with pytest.raises(ConfigError) as err:
            compute_curve.series_rows(compute_curve.parser().parse_args(
                ["--seeds", "0", "1", "--shots", "2", "--root", str(tree), *extra]))
        return str(err.value)

    assert "results/w_more/transfer.json: not run yet" in fails("--series", "t",
                                                              "w{_seed}_more:transfer")
    assert "put {seed} or {_seed}" in fails("--series", "t", "w:transfer")
    assert "expected study:method" in fails("--series", "t", "w{_seed}")
    missing = fails("--series", "t", "nothing{seed}:transfer")
    assert "experiments/nothing0.toml: no such study" in missing
    with pytest.raises(ConfigError, match="w/transfer.json: no draws at 3 shots"):
        compute_curve.unit_point(tree, "w:transfer", 3)
    study(tree, "w_seed1_more", 1, ["imaml_warm"], 4, extend_from="w_seed1")
    assert "no transfer run of 4 steps" in fails("--series", "t", "w{_seed}_more:imaml_warm")
    assert compute_curve.main(["--seeds", "0", "--root", str(tree),
                               "--series", "t", "w{_seed}:maml"]) == 2
    assert "w/maml.json: not run yet" in capsys.readouterr().err
