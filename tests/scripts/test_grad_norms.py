"""scripts/grad_norms.py: the meta-gradient's norm summarised from a unit's training log."""

from __future__ import annotations

import json
from pathlib import Path

from tests.scripts import load_script

grad_norms = load_script("grad_norms")


def _unit(root: Path, study: str, method: str, log: list[dict]) -> None:
    (root / "results" / study).mkdir(parents=True, exist_ok=True)
    (root / "results" / study / f"{method}.json").write_text(json.dumps({"train_log": log}))


def test_summary_worked_by_hand(tmp_path, capsys) -> None:
    # Steps out of order and one validation-only entry without grad_norm.
    norms = {1: 0.5, 2: 0.3, 3: 0.4, 4: 2.0, 5: 0.2, 6: 900.0}
    log = [{"step": s, "grad_norm": g} for s, g in reversed(norms.items())] + [{"step": 6}]
    _unit(tmp_path, "s", "maml", log)
    got = grad_norms.summary(grad_norms.norms(tmp_path, "s:maml"), after=3)
    # early: 0.5, 0.3, 0.4 -> median 0.4; later: 2.0, 0.2, 900 -> median 2.0, 2 of 3 above 1
    assert got == {"steps": 6, "median_early": 0.4, "median_late": 2.0, "max": 900.0,
                   "late_above_1": 2 / 3}
    assert grad_norms.main(["s:maml", "--after", "3", "--root", str(tmp_path)]) == 0
    assert "| s:maml | 6 | 0.40 | 2.00 | 900 | 67 % |" in capsys.readouterr().out


def test_a_unit_without_norms_or_results_is_a_clear_error(tmp_path, capsys) -> None:
    _unit(tmp_path, "old", "maml", [{"step": 1, "query_loss": 1.0}])
    assert grad_norms.main(["old:maml", "--root", str(tmp_path)]) == 2
    assert "has no grad_norm" in capsys.readouterr().err
    assert grad_norms.main(["old:imaml", "--root", str(tmp_path)]) == 2
    assert "old:imaml: no finished unit" in capsys.readouterr().err
