"""The study runner on a tiny synthetic study: units, skipping, report, figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imaml_seg import experiment
from imaml_seg.config import ConfigError
from imaml_seg.data.validate import DataError
from imaml_seg.experiment import Study, describe_settings, markdown_table, run_experiment
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
    # ... and over the test images (each image's Dice averaged over the draws).
    assert set(saved["wilcoxon_p_images"]) <= set(saved["wilcoxon_p"]) | {
        f"imaml_warm_vs_{m}@{k}" for m in ("scratch", "prototype") for k in (1, 2)
    }
    assert saved["wilcoxon_p_images"] and all(
        0 <= p <= 1 for p in saved["wilcoxon_p_images"].values()
    )


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
    (tmp_path / "results" / "mini.json").unlink()
    run_experiment(spec, Paths(Path(".")), quiet=True)
    assert (folder / "overlays.png").is_file() and (tmp_path / "results" / "mini.json").is_file()
    assert not (tmp_path / "runs").exists()  # finished units are not trained again
    # A unit evaluated elsewhere before predictions were saved is left out, with a warning.
    (folder / "prototype.overlay.npz").unlink()
    result = json.loads((folder / "prototype.json").read_text())
    result["machine"]["device"] = "another machine's GPU"
    (folder / "prototype.json").write_text(json.dumps(result))
    with pytest.warns(UserWarning, match="left out prototype"):
        run_experiment(spec, Paths(Path(".")), quiet=True)
    assert not (folder / "prototype.overlay.npz").exists()


def test_report_only_rebuilds_the_report_from_finished_units_without_running_any(
    tmp_path, monkeypatch
) -> None:
    spec = mini_study(tmp_path, ["scratch", "prototype"], 2, [1], 2)
    with pytest.raises(ConfigError, match="no finished unit yet"):
        run_experiment(spec, Paths(Path(".")), quiet=True, report_only=True)
    run_experiment(spec, Paths(Path(".")), quiet=True, only=["scratch"])
    summary = tmp_path / "results" / "mini.json"
    first = json.loads(summary.read_text())
    summary.unlink()
    (tmp_path / "results" / "mini" / "dice_vs_shots.png").unlink()
    rebuilt = run_experiment(spec, Paths(Path(".")), quiet=True, report_only=True)
    assert rebuilt["summary_dice"] == first["summary_dice"] and set(first["summary_dice"]) == {
        "scratch@1"
    }
    assert json.loads(summary.read_text())["records"] == first["records"]
    assert (tmp_path / "results" / "mini" / "dice_vs_shots.png").is_file()
    assert not (tmp_path / "runs" / "mini" / "prototype").exists()  # prototype never ran
    # Without the target's images (a reader of the committed results): table and plots, no grid.
    def no_data(*args, **kwargs):
        raise DataError("dataset 'synthetic:7' is looked up in the data root, which is not set")

    monkeypatch.setattr(experiment, "load_arrays", no_data)
    summary.unlink()
    (tmp_path / "results" / "mini" / "overlays.png").unlink()
    with pytest.warns(UserWarning, match="overlay figure not rebuilt"):
        again = run_experiment(spec, Paths(Path(".")), quiet=True, report_only=True)
    assert again["summary_dice"] == first["summary_dice"] and again["target"] == "synthetic:7"
    assert not (tmp_path / "results" / "mini" / "overlays.png").exists()
    with pytest.raises(DataError):  # running units needs the data
        run_experiment(spec, Paths(Path(".")), quiet=True)


def tuned_study(tmp_path: Path, methods: list[str], extra: str = "", stages: str = "") -> Path:
    """``experiments/mini_tuned.toml``: reuses mini's units, tunes test-time settings."""
    spec = tmp_path / "experiments" / "mini_tuned.toml"
    stages = stages or "[[{}, {inner_steps = 6}], [{}, {tta = true}]]"
    spec.write_text(
        f'name = "mini_tuned"\ntrain_from = "mini"\npreset = "{TINY}"\n'
        f"methods = {json.dumps(methods)}\nbaseline_steps = 2\n[overrides]\n"
        f"eval = {{ shots = [2], draws = 2 }}\n{extra}[tune]\ntasks = 2\nstages = {stages}\n"
    )
    return spec


def test_tuned_study_reuses_units_and_chooses_settings_on_the_sources(tmp_path) -> None:
    methods = ["scratch", "transfer", "prototype"]
    run_experiment(mini_study(tmp_path, methods, 2, [2], 2), Paths(Path(".")), quiet=True)
    runs = tmp_path / "runs"
    trained = {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")}
    out = run_experiment(tuned_study(tmp_path, methods), Paths(Path(".")), quiet=True)
    assert sorted(p.name for p in runs.iterdir()) == ["mini"]  # nothing trained again
    assert trained == {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")}
    folder = tmp_path / "results" / "mini_tuned"
    transfer = json.loads((folder / "transfer.tune.json").read_text())
    scores = {json.dumps(c["eval"], sort_keys=True): c["dice"] for c in transfer["candidates"]}
    first = max([{}, {"inner_steps": 6}], key=lambda c: scores[json.dumps(c, sort_keys=True)])
    assert set(scores) == {
        json.dumps(c, sort_keys=True) for c in ({}, {"inner_steps": 6}, {**first, "tta": True})
    }
    assert transfer["selected_on"] == ["synthetic:0:24", "synthetic:1:24"]
    assert scores[json.dumps(transfer["chosen"], sort_keys=True)] == max(
        scores[json.dumps(first, sort_keys=True)], scores[json.dumps({**first, "tta": True},
                                                                        sort_keys=True)]
    )
    # The baselines do not adapt: only test-time augmentation is tried for them.
    proto = json.loads((folder / "prototype.tune.json").read_text())
    assert [c["eval"] for c in proto["candidates"]] == [{}, {"tta": True}]
    # The scored unit used the chosen settings, and the report lists them.
    scored = json.loads((folder / "transfer.json").read_text())["eval"]
    assert scored["inner_steps"] == transfer["chosen"].get("inner_steps", 3)
    assert scored["tta"] == transfer["chosen"].get("tta", False)
    assert out["tuned"]["transfer"] == transfer["chosen"]
    table = markdown_table(out)
    assert "| method | test-time settings |" in table and "never on the target" in table
    assert f"| transfer | {describe_settings(transfer['chosen'])} |" in table


def test_settings_chosen_per_shot_count_are_tuned_scored_and_reported_per_shot(tmp_path) -> None:
    run_experiment(mini_study(tmp_path, ["scratch"], 2, [1, 2], 2), Paths(Path(".")), quiet=True)
    untuned = json.loads((tmp_path / "results" / "mini" / "scratch.json").read_text())["records"]
    spec = tmp_path / "experiments" / "mini_tuned.toml"
    spec.write_text(
        f'name = "mini_tuned"\ntrain_from = "mini"\npreset = "{TINY}"\nmethods = ["scratch"]\n'
        "baseline_steps = 2\n[overrides]\neval = { shots = [1, 2], draws = 2 }\n"
        "[tune]\ntasks = 2\nper_shot = true\nstages = [[{}, {inner_steps = 6}]]\n"
    )
    folder = tmp_path / "results" / "mini_tuned"
    # A choice that differs per shot count: 1 shot keeps the preset, 2 shots take 6 steps.
    folder.mkdir(parents=True)
    hand = {"chosen_per_shot": {"1": {}, "2": {"inner_steps": 6}}}
    (folder / "scratch.tune.json").write_text(json.dumps(hand))
    out = run_experiment(spec, Paths(Path(".")), quiet=True)
    scored = json.loads((folder / "scratch.json").read_text())
    assert "eval" not in scored
    assert [scored["eval_per_shot"][k]["inner_steps"] for k in ("1", "2")] == [3, 6]
    same = {(r["shots"], r["draw"]): r["dice"] for r in untuned}
    for r in scored["records"]:  # the same draws; only the 2-shot settings changed
        if r["shots"] == 1:
            assert r["dice"] == same[(1, r["draw"])]
    assert sorted((r["shots"], r["draw"]) for r in scored["records"]) == sorted(same)
    assert out["tuned"]["scratch"] == {"per_shot": hand["chosen_per_shot"]}
    table = markdown_table(out)
    assert "| scratch | 1-shot: preset; 2-shot: 6 steps |" in table
    # No iMAML variant to test against: no Wilcoxon column, and every line has as many cells.
    head, rule, row = table.splitlines()[:3]
    assert "Wilcoxon" not in head and head.count("|") == rule.count("|") == row.count("|") == 6
    # Tuned from scratch: one choice per shot count, each on tasks with that many support pairs.
    (folder / "scratch.tune.json").unlink()
    (folder / "scratch.json").unlink()
    run_experiment(spec, Paths(Path(".")), quiet=True)
    tuned = json.loads((folder / "scratch.tune.json").read_text())
    assert set(tuned["chosen_per_shot"]) == set(tuned["candidates_per_shot"]) == {"1", "2"}
    for k in ("1", "2"):
        candidates = tuned["candidates_per_shot"][k]
        assert [c["eval"] for c in candidates] == [{}, {"inner_steps": 6}]
        best = max(candidates, key=lambda c: c["dice"])["eval"]
        assert tuned["chosen_per_shot"][k] == best


def test_settings_are_described_in_a_few_words() -> None:
    assert describe_settings({}) == "preset"
    chosen = {"inner_steps": 100, "inner_lr": 0.3, "augment_support": True, "tta": False}
    assert describe_settings(chosen) == "100 steps, lr 0.3, support aug"
    assert describe_settings({"optimizer": "adam", "tta": True}) == "Adam, TTA"
    assert describe_settings({"support_cv": True, "support_cv_rule": "one_se"}) == (
        "steps by support CV, one-SE rule"
    )
    assert describe_settings({"support_cv": True, "support_cv_rule": "best"}) == (
        "steps by support CV"
    )
    assert describe_settings({"support_cv": True, "support_cv_rule": "paired_se"}) == (
        "steps by support CV, paired-SE rule"
    )
    per_shot = {"per_shot": {"10": {"tta": True}, "1": {}}}
    assert describe_settings(per_shot) == "1-shot: preset; 10-shot: TTA"


def test_tuned_study_refuses_other_training_settings_and_unknown_candidates(tmp_path) -> None:
    mini_study(tmp_path, ["scratch"], 2, [2], 2)
    spec = tuned_study(tmp_path, ["scratch"], extra="inner = { inner_lr = 0.05 }\n")
    with pytest.raises(ConfigError, match="only \\[eval\\] may differ"):
        run_experiment(spec, Paths(Path(".")), quiet=True)
    spec = tuned_study(tmp_path, ["scratch"], stages="[[{}, {inner_stepz = 6}]]")
    with pytest.raises(ConfigError, match="inner_stepz"):
        run_experiment(spec, Paths(Path(".")), quiet=True)
    spec.write_text(spec.read_text().replace("[tune]\n", "[tune]\nper_shots = true\n"))
    with pytest.raises(ConfigError, match="unknown \\[tune\\] keys \\['per_shots'\\]"):
        run_experiment(spec, Paths(Path(".")), quiet=True)


def test_a_tune_menu_file_gives_the_stages_it_lists(tmp_path) -> None:
    mini_study(tmp_path, ["scratch"], 2, [2], 2)
    stages = "[[{}, {inner_steps = 6}], [{}, {tta = true}]]"
    inline = Study.from_file(tuned_study(tmp_path, ["scratch"], stages=stages))
    menus = tmp_path / "experiments" / "menus"
    menus.mkdir()
    (menus / "small.toml").write_text(f"stages = {stages}\n")
    spec = tmp_path / "experiments" / "mini_tuned.toml"
    spec.write_text(spec.read_text().replace(f"stages = {stages}", 'menu = "small"'))
    assert Study.from_file(spec).tune_stages == inline.tune_stages == (
        ({}, {"inner_steps": 6}), ({}, {"tta": True})
    )
    spec.write_text(spec.read_text().replace('"small"', '"large"'))
    with pytest.raises(ConfigError, match=r"menu 'large': .*large.toml not found \(menus: small\)"):
        Study.from_file(spec)
    both = f'menu = "small"\nstages = {stages}'
    spec.write_text(spec.read_text().replace('menu = "large"', both))
    with pytest.raises(ConfigError, match="both stages and menu"):
        Study.from_file(spec)
    (menus / "small.toml").write_text("stages = [{inner_steps = 6}]\n")
    spec.write_text(spec.read_text().replace(f"stages = {stages}\n", ""))
    with pytest.raises(ConfigError, match=r"small.toml: needs stages = \[\["):
        Study.from_file(spec)


def test_extend_from_continues_the_shorter_studys_runs(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch", "imaml"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True)
    runs = tmp_path / "runs"
    short_log = (runs / "mini" / "imaml" / "log.jsonl").read_text().splitlines()
    longer = spec.with_name("mini_long.toml")
    text = spec.read_text().replace('name = "mini"', 'name = "mini_long"\nextend_from = "mini"')
    meta_steps = int(experiment.Study.from_file(spec).config.meta.meta_steps)
    longer.write_text(text + f"meta = {{ meta_steps = {meta_steps + 1} }}\n")
    run_experiment(longer, Paths(Path(".")), quiet=True)
    log = (runs / "mini_long" / "imaml" / "log.jsonl").read_text().splitlines()
    assert log[:meta_steps] == short_log and len(log) == meta_steps + 1  # continued, not redone
    assert (runs / "mini" / "imaml" / "log.jsonl").read_text().splitlines() == short_log
    # Other settings than a longer budget cannot be continued: refused, naming the run.
    other = spec.with_name("mini_other.toml")
    other.write_text(
        text.replace("mini_long", "mini_other")
        + f"meta = {{ meta_steps = {meta_steps + 1}, meta_lr = 0.5 }}\n"
    )
    with pytest.raises(ConfigError, match=r"extend_from = 'mini'.*only the steps it trains"):
        run_experiment(other, Paths(Path(".")), quiet=True)


def test_extend_from_continues_warm_imaml_only_from_the_same_warm_start(tmp_path) -> None:
    spec = mini_study(tmp_path, ["imaml_warm"], 2, [1], 1)
    run_experiment(spec, Paths(Path(".")), quiet=True)
    runs = tmp_path / "runs"
    short_log = (runs / "mini" / "imaml_warm" / "log.jsonl").read_text().splitlines()
    meta = experiment.Study.from_file(spec).config.meta
    text = spec.read_text().replace('name = "mini"', 'name = "NAME"\nextend_from = "mini"')
    # The same transfer weights: the warm-started run is continued.
    same = spec.with_name("mini_same.toml")
    same.write_text(text.replace("NAME", "mini_same")
                    + f"meta = {{ meta_steps = {meta.meta_steps + 1} }}\n")
    run_experiment(same, Paths(Path(".")), quiet=True)
    log = (runs / "mini_same" / "imaml_warm" / "log.jsonl").read_text().splitlines()
    assert log[: meta.meta_steps] == short_log and len(log) == meta.meta_steps + 1
    config = json.loads((runs / "mini_same" / "imaml_warm" / "config.json").read_text())
    assert "mini_same" in config["meta"]["warm_start"]
    # Transfer trained longer: other warm-start weights, so warm iMAML starts over.
    longer = spec.with_name("mini_longer.toml")
    longer.write_text(
        text.replace("NAME", "mini_longer")
        + f"meta = {{ meta_steps = {meta.meta_steps + 1}, "
        f"pretrain_steps = {meta.pretrain_steps + 1} }}\n"
    )
    with pytest.warns(UserWarning, match="trained from the start"):
        run_experiment(longer, Paths(Path(".")), quiet=True)
    log = (runs / "mini_longer" / "imaml_warm" / "log.jsonl").read_text().splitlines()
    assert len(log) == meta.meta_steps + 1 and log[0] != short_log[0]
    transfer = (runs / "mini_longer" / "transfer" / "log.jsonl").read_text().splitlines()
    assert len(transfer) == meta.pretrain_steps + 1


def test_a_unit_folder_trained_with_other_settings_is_refused_not_resumed(tmp_path) -> None:
    spec = mini_study(tmp_path, ["imaml_warm"], 2, [1], 1)
    run_experiment(spec, Paths(Path(".")), quiet=True)
    shutil.rmtree(tmp_path / "results")
    # The study file edited in place: warm iMAML's run holds start_weight 0, the study asks 0.3.
    spec.write_text(spec.read_text() + "meta = { start_weight = 0.3 }\n")
    run = tmp_path / "runs" / "mini" / "imaml_warm"
    before = (run / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"imaml_warm was trained with other settings "
                       r"\(meta.start_weight = 0.0 there, 0.3 here\); move it away"):
        run_experiment(spec, Paths(Path(".")), quiet=True)
    assert (run / "checkpoint.safetensors").read_bytes() == before
    # Transfer does not read the term, so its run is kept; warm iMAML trains anew once moved.
    shutil.move(run, tmp_path / "old_imaml_warm")
    run_experiment(spec, Paths(Path(".")), quiet=True)
    assert json.loads((run / "config.json").read_text())["meta"]["start_weight"] == 0.3


def test_a_training_seed_retrains_on_the_same_draws_and_the_report_says_so(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch"], 2, [1], 3)
    first = run_experiment(spec, Paths(Path(".")), quiet=True)
    retrain = spec.with_name("mini_s1.toml")
    text = spec.read_text().replace('name = "mini"', 'name = "mini_s1"\ntrain_seed = 1')
    retrain.write_text(text)
    second = run_experiment(retrain, Paths(Path(".")), quiet=True)
    assert (first["seed"], first["train_seed"]) == (0, 0)
    assert (second["seed"], second["train_seed"]) == (0, 1)
    assert "training seed" not in markdown_table(first)
    assert "Trained with training seed 1 (draws of seed 0)." in markdown_table(second)
    # Scratch's initialisation follows the training seed, so its scores move.
    assert [r["dice"] for r in first["records"]] != [r["dice"] for r in second["records"]]


def test_a_unit_scored_on_other_draws_than_the_study_now_says_is_refused(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True)
    unit = tmp_path / "results" / "mini" / "scratch.json"
    assert json.loads(unit.read_text())["draws"]["seed"] == 0
    spec.write_text(spec.read_text().replace('name = "mini"', 'name = "mini"\nseed = 3'))
    for report_only in (False, True):
        with pytest.raises(ConfigError, match=r"scratch.json: scored with seed = 0, but study "
                           r"mini now says seed = 3; move the file away"):
            run_experiment(spec, Paths(Path(".")), quiet=True, report_only=report_only)


@pytest.mark.parametrize(
    "spec",
    sorted((Path(__file__).parents[1] / "experiments").glob("*.toml")),
    ids=lambda p: p.stem,
)
def test_committed_study_files_load(spec: Path) -> None:
    """Every study in ``experiments/`` parses, names itself after its file (the runner's
    results and runs folders are named after it) and, where it extends another study, points
    at one that exists."""
    study = Study.from_file(spec)
    assert study.name == spec.stem
    assert set(study.methods) <= set(experiment.METHODS)
    if study.extend_from is not None:
        assert (spec.parent / f"{study.extend_from}.toml").is_file()


def test_support_cv_study_records_and_reports_the_steps_it_chose(tmp_path) -> None:
    spec = mini_study(tmp_path, ["scratch"], 2, [1, 2], 3)
    spec.write_text(spec.read_text().replace(
        "draws = 3 }", "draws = 3, support_cv = true }"
    ))
    out = run_experiment(spec, Paths(Path(".")), quiet=True)
    steps = {(r["shots"], r["draw"]): r["inner_steps"] for r in out["records"]}
    assert [steps[(1, d)] for d in range(3)] == [3, 3, 3]  # one shot: the most steps
    assert all(steps[(2, d)] in (0, 1, 3) for d in range(3))
    assert sum(out["steps_chosen"]["scratch@2"].values()) == 3
    assert out["steps_chosen"]["scratch@1"] == {"3": 3}
    table = markdown_table(out)
    chosen = ", ".join(f"{n} ({c})" for n, c in sorted(out["steps_chosen"]["scratch@2"].items(),
                                                      key=lambda nc: int(nc[0])))
    assert f"2-shot: scratch {chosen};" in table and "1-shot:" not in table
    assert "its shots, steps" in table and out["support_cv_rule"] == "best"
    assert "its shots (one-standard-error rule), steps" in markdown_table(
        {**out, "support_cv_rule": "one_se"}
    )
    assert "its shots (paired one-standard-error rule), steps" in markdown_table(
        {**out, "support_cv_rule": "paired_se"}
    )


def test_units_that_ignore_the_support_set_get_no_p_value_between_them(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml"], 2, [1, 2], 3)
    spec.write_text(spec.read_text().replace("draws = 3 }", "draws = 3, inner_steps = 0 }"))
    out = run_experiment(spec, Paths(Path(".")), quiet=True)
    for method in ("transfer", "imaml"):
        dice = {r["dice"] for r in out["records"] if r["method"] == method and r["shots"] == 2}
        assert len(dice) == 1  # no fine-tuning: the draws repeat one evaluation
    assert out["wilcoxon_p"].get("imaml_vs_transfer@2") is None
    table = markdown_table(out)
    # Over the test images the two are compared: each image's Dice differs between them.
    p_images = out["wilcoxon_p_images"]["imaml_vs_transfer@2"]
    transfer_row = table.split("| transfer |")[1].split("\n")[0]
    assert transfer_row.endswith(f"| - / {p_images:.2g} |")  # its p-values against imaml
    assert "transfer, imaml score the same on every 2-shot draw" in table


def test_start_blend_scores_warm_imaml_from_its_mix_with_transfer(tmp_path) -> None:
    folder = tmp_path / "experiments"
    folder.mkdir()

    def write(name: str, methods: list[str], eval_: str, extra: str = "") -> Path:
        spec = folder / f"{name}.toml"
        train_from = 'train_from = "mini"\n' if name != "mini" else ""
        spec.write_text(
            f'name = "{name}"\n{train_from}preset = "{TINY}"\nmethods = {json.dumps(methods)}\n'
            f"[overrides]\neval = {{ shots = [2], draws = 2, inner_steps = 0{eval_} }}\n{extra}"
        )
        return spec

    run_experiment(write("mini", ["transfer", "imaml_warm"], ""), Paths(Path(".")), quiet=True)
    results = tmp_path / "results"

    def dice(study: str, method: str) -> list[float]:
        records = json.loads((results / study / f"{method}.json").read_text())["records"]
        return [r["dice"] for r in sorted(records, key=lambda r: r["draw"])]

    assert dice("mini", "imaml_warm") != dice("mini", "transfer")
    # All of the start: warm iMAML's weights become transfer's, and so do its scores.
    run_experiment(write("whole", ["imaml_warm"], ", start_blend = 1.0"), Paths(Path(".")),
                   quiet=True)
    assert dice("whole", "imaml_warm") == dice("mini", "transfer")
    assert json.loads((results / "whole" / "imaml_warm.json").read_text())["eval"][
        "start_blend"] == 1.0
    # Only imaml_warm has a start to blend with: a study listing others is refused at once ...
    with pytest.raises(ConfigError, match="only imaml_warm has them.*transfer, imaml_warm"):
        Study.from_file(write("both", ["transfer", "imaml_warm"], ", start_blend = 0.5"))
    # ... and a tuned study tries the fraction for imaml_warm alone.
    tuned = write("tuned", ["transfer", "imaml_warm"], "",
                  "[tune]\ntasks = 2\nstages = [[{}, {start_blend = 1.0}]]\n")
    run_experiment(tuned, Paths(Path(".")), quiet=True)
    tried = {m: [c["eval"] for c in json.loads(
        (results / "tuned" / f"{m}.tune.json").read_text())["candidates"]]
        for m in ("transfer", "imaml_warm")}
    assert tried == {"transfer": [{}], "imaml_warm": [{}, {"start_blend": 1.0}]}
    # blend_only_unadapted: the blend where no step is taken, theta as trained where steps are.
    run_experiment(write("unadapted", ["imaml_warm"], ", start_blend = 1.0, "
                         "blend_only_unadapted = true"), Paths(Path(".")), quiet=True)
    assert dice("unadapted", "imaml_warm") == dice("mini", "transfer")
    for name, extra in (("adapted", ", start_blend = 1.0, blend_only_unadapted = true"),
                        ("plain", "")):
        spec = write(name, ["imaml_warm"], extra)
        spec.write_text(spec.read_text().replace("inner_steps = 0", "inner_steps = 2"))
        run_experiment(spec, Paths(Path(".")), quiet=True)
    assert dice("adapted", "imaml_warm") == dice("plain", "imaml_warm")
