"""scripts/budget_table.py: a split's studies as one table of budgets by method and policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaml_seg.config import ConfigError
from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths
from tests.scripts import load_script
from tests.scripts.test_step_policies import _companion
from tests.test_experiment import mini_study

budget_table = load_script("budget_table")


def test_cells_sit_under_their_budget_and_policy_and_the_best_is_bold(tmp_path, capsys) -> None:
    study = mini_study(tmp_path, ["scratch", "imaml"], 2, [1, 2], 3)
    run_experiment(study, Paths(Path(".")), quiet=True)
    saved = json.loads((tmp_path / "results" / "mini.json").read_text())
    imaml, scratch = (saved["summary_dice"][f"{m}@2"]["mean"] for m in ("imaml", "scratch"))
    _companion(study, "_zeroshot", -0.25)  # mini_zeroshot: 1x, no fine-tuning
    _companion(study, "_4x", 0.5)  # mini_4x: the 4x budget's preset loop (imaml only)
    budgets, found = budget_table.cells(tmp_path, "mini", 2)
    assert budgets == ["1x", "4x"]
    assert found == pytest.approx({
        ("scratch", "preset loop", "1x"): scratch,
        ("imaml", "preset loop", "1x"): imaml,
        ("imaml", "no fine-tuning", "1x"): imaml - 0.25,
        ("imaml", "preset loop", "4x"): imaml + 0.5,
    })
    assert budget_table.main(["mini", "--shots", "2", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | test-time policy | 1x | 4x |"
    best_1x = max(imaml, scratch)
    cell = f"**{scratch:.3f}**" if scratch == best_1x else f"{scratch:.3f}"
    assert lines[2] == f"| scratch | preset loop | {cell} | - |"
    assert lines[4] == f"| imaml | no fine-tuning | {imaml - 0.25:.3f} | - |"
    assert lines[3].endswith(f"| **{imaml + 0.5:.3f}** |")
    # The README block is rewritten in place, and only the block made with the same arguments.
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- BUDGETS: mini --shots 2 -->\nold\n<!-- /BUDGETS -->\ny\n")
    args = ["mini", "--shots", "2", "--root", str(tmp_path)]
    assert budget_table.main([*args, "--readme", str(readme)]) == 0
    ((block_args, block),) = budget_table.readme_blocks(readme.read_text())
    assert block_args == ["mini", "--shots", "2"] and block == "\n".join(lines) + "\n"
    assert readme.read_text().endswith("<!-- /BUDGETS -->\ny\n")
    assert budget_table.main(["mini", "--shots", "1", "--root", str(tmp_path),
                              "--readme", str(readme)]) == 2
    assert "has no '<!-- BUDGETS: mini --shots 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no finished unit at 7 shots"):
        budget_table.table(budget_table.parser().parse_args(["mini", "--shots", "7",
                                                              "--root", str(tmp_path)]))
    assert budget_table.main(["nothing", "--root", str(tmp_path)]) == 2
    assert "nothing.toml: no such study" in capsys.readouterr().err
