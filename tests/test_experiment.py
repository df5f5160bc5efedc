"""The study runner on a tiny synthetic study: units, skipping, report, figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"


def mini_study(tmp_path: Path, methods: list[str], steps: int, shots: list[int], draws: int):
    """``experiments/mini.toml`` under ``tmp_path``: a tiny synthetic study of ``methods``."""
    spec = tmp_path / "experiments" / "mini.toml"
    spec.parent.mkdir()
    spec.write_text(
        f'name = "mini"\npreset = "{TINY}"\nmethods = {json.dumps(methods)}\n'
        f"baseline_steps = {steps}\n[overrides]\neval = {{ shots = {shots}, draws = {draws} }}\n"
    )
    return spec


def test_study_runs_skips_finished_units_and_reports(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch", "imaml_warm", "prototype"], 3, [1, 2], 3)
    out = run_experiment(spec, Paths(Path(".")), quiet=True)
    results = tmp_path / "results"
    assert (results / "mini.json").is_file()
    for name in ("scratch", "imaml_warm", "prototype", "dice_vs_shots", "overlays",
                 "learning_curves"):
        assert any(p.stem == name for p in (results / "mini").iterdir()), name
    assert (tmp_path / "runs" / "mini" / "transfer" / "checkpoint.safetensors").is_file()
    records = out["records"]
    assert len(records) == 3 * 2 * 3  # methods x shot counts x draws
    # The same support draws for every method: per-draw records line up.
    keys = {(r["shots"], r["draw"]) for r in records if r["method"] == "scratch"}
    assert keys == {(r["shots"], r["draw"]) for r in records if r["method"] == "prototype"}
    assert set(out["summary_dice"]) == {f"{m}@{k}" for m in ("scratch", "imaml_warm",
                                                             "prototype") for k in (1, 2)}
    # A second run finds every unit done and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in (results / "mini").glob("*.json")}
    run_experiment(spec, Paths(Path(".")), quiet=True)
    assert before == {p: p.stat().st_mtime_ns for p in (results / "mini").glob("*.json")}
    saved = json.loads((results / "mini.json").read_text())
    assert saved["target"] == "synthetic:7" and saved["machines"]["scratch"]["torch"]
    # Every other method is tested against the iMAML variant, per shot count (3 paired draws).
    assert {"imaml_warm_vs_scratch@1", "imaml_warm_vs_prototype@2"} <= set(saved["wilcoxon_p"])
    assert all(0 <= p <= 1 for p in saved["wilcoxon_p"].values())


def test_overlay_figure_needs_no_weights_and_leaves_out_units_from_elsewhere(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch", "prototype"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True)
    folder = tmp_path / "results" / "mini"
    assert {p.name for p in folder.glob("*.overlay.npz")} == {
        "scratch.overlay.npz", "prototype.overlay.npz"
    }
    # Units trained on another machine: no runs/ here; the saved predictions suffice.
    shutil.rmtree(tmp_path / "runs")
    (folder / "overlays.png").unlink()
    run_experiment(spec, Paths(Path(".")), quiet=True)
    assert (folder / "overlays.png").is_file()
    # A unit evaluated elsewhere before predictions were saved is left out, with a warning.
    (folder / "prototype.overlay.npz").unlink()
    result = json.loads((folder / "prototype.json").read_text())
    result["machine"]["device"] = "another machine's GPU"
    (folder / "prototype.json").write_text(json.dumps(result))
    with pytest.warns(UserWarning, match="left out prototype"):
        run_experiment(spec, Paths(Path(".")), quiet=True)
    assert not (folder / "prototype.overlay.npz").exists()
