"""scripts/source_scores.py: two methods' weights scored without fine-tuning on every dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from imaml_seg.checkpoint import load_checkpoint
from imaml_seg.config import ConfigError
from imaml_seg.data.cache import load_arrays
from imaml_seg.data.tasks import test_pool
from imaml_seg.evaluation import predict_logits
from imaml_seg.experiment import run_experiment
from imaml_seg.meta.trainer import Paths
from imaml_seg.metrics import dice
from imaml_seg.model import build_model, forward
from tests.scripts import load_script
from tests.test_experiment import mini_study

source_scores = load_script("source_scores")


def test_spearman_ranks_and_refuses_too_few_or_constant_pairs() -> None:
    assert source_scores.spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert source_scores.spearman([3.0, 2.0, 1.0], [0.0, 1.0, 5.0]) == pytest.approx(-1.0)
    assert math.isnan(source_scores.spearman([1.0, 2.0], [1.0, 2.0]))
    assert math.isnan(source_scores.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_script_scores_weights_on_each_test_pool_saves_and_reprints(
    tmp_path, capsys, monkeypatch
) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    study = source_scores.load_studies(tmp_path, ["mini"])[0]
    config = study.config

    def load(name):
        return load_arrays(name, config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    with pytest.raises(ConfigError, match="sources.json: nothing saved for"):
        source_scores.method_scores(tmp_path, study, "transfer")
    monkeypatch.setattr(source_scores, "BATCH", 5)  # pools of 12 images: batches of 5, 5, 2
    scores = source_scores.method_scores(tmp_path, study, "transfer", load)
    assert list(scores) == [*config.sources, config.target]
    # The target's entry is the weights' own prediction on its whole test pool, image by image.
    checkpoint = load_checkpoint(tmp_path / "runs" / "mini" / "transfer")
    x, y = test_pool(load(config.target), test_fraction=config.data.test_fraction,
                     split_seed=config.data.split_seed)
    with torch.no_grad():
        pred = (torch.sigmoid(forward(build_model(checkpoint.config.model), checkpoint.theta,
                                      x)) > 0.5).float()
    assert scores[config.target] == pytest.approx(dice(pred, y).tolist(), abs=1e-6)
    assert len(scores[config.sources[0]]) == len(test_pool(
        load(config.sources[0]), test_fraction=config.data.test_fraction,
        split_seed=config.data.split_seed)[0])
    # Saved beside the result: printed again without weights or images.
    saved = tmp_path / "results" / "mini" / "transfer.sources.json"
    assert json.loads(saved.read_text()) == scores
    assert source_scores.main(["mini", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| study: imaml_warm / transfer (difference, points) |")
    assert "| mini | " in out and "(1 studies) | - | - | - |" in out
    shutil.rmtree(tmp_path / "runs")
    args = source_scores.parser().parse_args(["mini", "--root", str(tmp_path)])
    assert source_scores.make(args, compute=False) + "\n" == out
    with pytest.raises(ConfigError, match="no weights under"):
        source_scores.method_scores(tmp_path, study, "imaml", load)


def test_table_gives_each_dataset_its_difference_and_the_rank_correlation(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer"], 1, [1], 1)
    for name in ("a", "b", "c"):
        spec.with_name(f"{name}.toml").write_text(
            spec.read_text().replace('name = "mini"', f'name = "{name}"'))
    studies = source_scores.load_studies(tmp_path, ["a", "b", "c"])
    s0, s1 = studies[0].config.sources
    target = studies[0].config.target

    def pair(first: float, second: float, goal: float) -> tuple[dict, dict]:
        return ({s0: [first, first], s1: [0.5], target: [goal, goal, goal]},
                {s0: [0.5, 0.5], s1: [second], target: [0.5, 0.5, 0.5]})

    # Source 0's difference ranks the target's exactly, source 1's the other way round; the
    # sources' means (+5.0, +5.0, +7.5) rank as (1.5, 1.5, 3) against (2, 3, 1): -1.5 / 3 ** 0.5.
    scores = [pair(0.6, 0.5, 0.52), pair(0.7, 0.6, 0.55), pair(0.55, 0.4, 0.51)]
    lines = source_scores.table(studies, scores, ["imaml_warm", "transfer"]).splitlines()
    assert lines[0].endswith(f"| {s0} (2 images) | {s1} (1 images) | sources' mean | "
                             f"{target}, target (3 images) |")
    assert lines[2] == "| a | 0.600 / 0.500 (+10.0) | 0.500 / 0.500 (+0.0) | +5.0 | " \
                       "0.520 / 0.500 (+2.0) |"
    # Each column's difference over the studies: source 0 +10, +20, +5; source 1 0, -10, +10;
    # their means +5, +5, +7.5; the target +2, +5, +1.
    assert lines[5] == "| difference over the 3 studies, mean +- sd | +11.7 +- 7.6 | " \
                       "+0.0 +- 10.0 | +5.8 +- 1.4 | +2.7 +- 2.1 |"
    assert lines[6] == "| rank correlation with the target's difference (3 studies) | +1.00 | " \
                       "-1.00 | -0.87 | |"


def test_studies_with_other_sources_are_refused(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer"], 1, [1], 1)
    other = spec.with_name("other.toml")
    other.write_text(spec.read_text().replace('name = "mini"', 'name = "other"\n'
                                              'target = "synthetic:6:24"'))
    with pytest.raises(ConfigError, match="other: sources, target or resolution differ"):
        source_scores.load_studies(tmp_path, ["mini", "other"])
    # Same datasets, another test split: the images scored would differ.
    split = spec.with_name("split.toml")
    split.write_text(spec.read_text().replace('name = "mini"', 'name = "split"')
                     + "data = { split_seed = 1 }\n")
    with pytest.raises(ConfigError, match="split: .* or the test split does"):
        source_scores.load_studies(tmp_path, ["mini", "split"])
    with pytest.raises(ConfigError, match="absent.toml: study file not found"):
        source_scores.load_studies(tmp_path, ["mini", "absent"])


def test_rule_keeps_a_where_it_leads_on_the_named_source_and_scores_it_on_the_target(
    tmp_path,
) -> None:
    spec = mini_study(tmp_path, ["transfer"], 1, [1], 1)
    for name in ("a", "b"):
        spec.with_name(f"{name}.toml").write_text(
            spec.read_text().replace('name = "mini"', f'name = "{name}"'))
    studies = source_scores.load_studies(tmp_path, ["a", "b"])
    s0, s1 = studies[0].config.sources
    target = studies[0].config.target
    # Study a: A leads by 2 points on source 0 (kept), and by 10 on the target; study b: by 0.5
    # (not kept: B's weights), while A trails by 20 on the target.
    scores = [({s0: [0.52], s1: [0.5], target: [0.6]}, {s0: [0.5], s1: [0.5], target: [0.5]}),
              ({s0: [0.505], s1: [0.9], target: [0.3]}, {s0: [0.5], s1: [0.5], target: [0.5]})]
    line = source_scores.rule(studies, scores, ["imaml_warm", "transfer"], s0, 1.0)
    # The rule scores 0.6 and 0.5 (mean 0.55); always B 0.5 and 0.5; always A 0.6 and 0.3.
    assert "imaml_warm kept on 1 of 2 studies (a)" in line
    assert "score 0.550 (transfer 0.500, imaml_warm 0.450)" in line
    assert "+5.0 +- 7.1 points over always transfer, +10.0 +- 14.1 over always imaml_warm" in line
    # On source 1 A leads by 40 on b only: the rule keeps it there, where it loses.
    assert "kept on 1 of 2 studies (b)" in source_scores.rule(
        studies, scores, ["imaml_warm", "transfer"], s1, 1.0)
    with pytest.raises(ConfigError, match="--rule: nowhere is not one of"):
        source_scores.rule(studies, scores, ["imaml_warm", "transfer"], "nowhere", 1.0)


def test_sources_only_never_scores_the_target_and_predicts_from_references(
    tmp_path, capsys
) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1], 1)
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    spec.with_name("ref.toml").write_text(
        spec.read_text().replace('name = "mini"', 'name = "ref"\ntrain_from = "mini"'))
    study = source_scores.load_studies(tmp_path, ["mini"])[0]
    target = study.config.target
    common = ["--root", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert source_scores.main(["mini", "--sources-only", *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("| sources' mean |") and target not in out
    saved = json.loads((tmp_path / "results" / "mini" / "transfer.sources.json").read_text())
    assert sorted(saved) == sorted(study.config.sources)  # the target was never scored
    # The reference is scored on the target as well; the study to predict still is not.
    assert source_scores.main(["mini", "--sources-only", "--rule", study.config.sources[0], "0",
                               "--reference", "ref", *common]) == 0
    out = capsys.readouterr().out
    assert "Prediction for mini: imaml_warm leads transfer on" in out
    assert "By rank among 1 reference studies" in out
    assert target in json.loads(
        (tmp_path / "results" / "ref" / "transfer.sources.json").read_text())
    assert target not in json.loads(
        (tmp_path / "results" / "mini" / "transfer.sources.json").read_text())
    assert source_scores.main(["mini", "--rule", "x", "1", "--reference", "ref", *common]) == 2
    assert "--reference needs --sources-only and --rule" in capsys.readouterr().err
    assert source_scores.main(["mini", "--sources-only", "--rule", "x", "1", "--reference",
                               "mini", *common]) == 2
    assert "--reference: mini is also a study to predict" in capsys.readouterr().err


def test_prediction_keeps_by_the_threshold_and_bounds_by_the_nearest_references(
    tmp_path,
) -> None:
    mini_study(tmp_path, ["transfer"], 1, [1], 1)
    studies = source_scores.load_studies(tmp_path, ["mini"])
    s0, s1 = studies[0].config.sources
    target = studies[0].config.target
    # A leads by 1.2 points on source 0: more than 1, so A is kept.
    scores = [({s0: [0.512], s1: [0.5]}, {s0: [0.5], s1: [0.5]})]
    references = [(0.0, -5.0), (0.5, 1.0), (1.0, 3.0), (2.0, 4.0), (3.0, 8.0)]
    line = source_scores.predict(studies, scores, ["imaml_warm", "transfer"], s0, 1.0,
                                 references)
    assert f"leads transfer on {s0} by +1.2 points (0.512 / 0.500), more than 1: the rule " \
           "keeps imaml_warm." in line
    # Two nearest below (+0.5, +1.0) and above (+2.0, +3.0): target leads 1, 3, 4, 8.
    assert f"{s0} -> {target} lead: +0.5 -> +1.0; +1.0 -> +3.0; +2.0 -> +4.0; +3.0 -> +8.0)" \
        in line
    assert "should be from +1.0 to +8.0 points." in line
    # Above every reference: open-ended, at least the least of the two nearest below.
    high = [({s0: [0.56], s1: [0.5]}, {s0: [0.5], s1: [0.5]})]
    line = source_scores.predict(studies, high, ["imaml_warm", "transfer"], s0, 1.0,
                                 references)
    assert "should be +4.0 points or more." in line
    # At or under the threshold B is kept; without references no range is given.
    low = [({s0: [0.505], s1: [0.5]}, {s0: [0.5], s1: [0.5]})]
    line = source_scores.predict(studies, low, ["imaml_warm", "transfer"], s0, 1.0, [])
    assert line.endswith("not more than 1: the rule keeps transfer.")
    # Below every reference: at most the greatest of the two nearest above (-5.0, +1.0).
    assert "should be +1.0 points or less." in source_scores.predict(
        studies, [({s0: [0.49], s1: [0.5]}, {s0: [0.5], s1: [0.5]})],
        ["imaml_warm", "transfer"], s0, 1.0, references)
    with pytest.raises(ConfigError, match="--rule: nowhere is not one of"):
        source_scores.predict(studies, low, ["imaml_warm", "transfer"], "nowhere", 1.0, [])


def rescoring_study(spec: Path, rest: str, eval_fields: str, methods: str | None = None) -> None:
    """Write ``mini_<rest>``: mini's trained units (``train_from``) scored with ``eval_fields``
    added to its ``[eval]`` (and only ``methods`` where given), for ``METHOD@<rest>``."""
    text = (spec.read_text().replace('name = "mini"', 'name = "mini"\ntrain_from = "mini"')
            .replace('name = "mini"', f'name = "mini_{rest}"', 1)
            .replace("draws = 2 }", f"draws = 2, {eval_fields} }}"))
    if methods is not None:
        text = text.replace('methods = ["transfer", "imaml_warm"]', f"methods = {methods}")
    spec.with_name(f"mini_{rest}.toml").write_text(text)


def test_method_at_rest_scores_the_weights_blended_by_another_study(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    # mini_whole scores mini's warm iMAML wholly blended into its start: transfer's weights.
    rescoring_study(spec, "whole", "start_blend = 1.0", methods='["imaml_warm"]')
    study = source_scores.load_studies(tmp_path, ["mini"])[0]

    def load(name):
        return load_arrays(name, study.config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    whole = source_scores.method_scores(tmp_path, study, "imaml_warm@whole", load)
    assert whole == source_scores.method_scores(tmp_path, study, "transfer", load)
    assert whole != source_scores.method_scores(tmp_path, study, "imaml_warm", load)
    assert (tmp_path / "results" / "mini_whole" / "imaml_warm.sources.json").is_file()
    with pytest.raises(ConfigError, match="mini_whole does not score mini's transfer"):
        source_scores.method_scores(tmp_path, study, "transfer@whole", load)
    # A blend chosen on the sources (a tuned study) is read from its choice.
    spec.with_name("mini_tuned.toml").write_text(
        spec.read_text().replace('name = "mini"', 'name = "mini_tuned"\ntrain_from = "mini"')
        .replace('methods = ["transfer", "imaml_warm"]', 'methods = ["imaml_warm"]')
        + "[tune]\nstages = [[{}, {start_blend = 1.0}]]\n")
    with pytest.raises(ConfigError, match="mini_tuned:imaml_warm: not tuned yet"):
        source_scores.method_scores(tmp_path, study, "imaml_warm@tuned", load)
    folder = tmp_path / "results" / "mini_tuned"
    folder.mkdir()
    (folder / "imaml_warm.tune.json").write_text(json.dumps({"chosen": {"start_blend": 1.0}}))
    assert source_scores.method_scores(tmp_path, study, "imaml_warm@tuned", load) == whole


def test_method_at_rest_with_tta_averages_each_image_over_flips_and_rotations(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer", "imaml_warm"], 2, [1], 2)
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    rescoring_study(spec, "tta", "tta = true")
    study = source_scores.load_studies(tmp_path, ["mini"])[0]
    config = study.config

    def load(name):
        return load_arrays(name, config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    scores = source_scores.method_scores(tmp_path, study, "transfer@tta", load)
    checkpoint = load_checkpoint(tmp_path / "runs" / "mini" / "transfer")
    x, y = test_pool(load(config.target), test_fraction=config.data.test_fraction,
                     split_seed=config.data.split_seed)
    logits = predict_logits(build_model(checkpoint.config.model), checkpoint.theta, x,
                            torch.device("cpu"), tta=True)
    expected = dice((torch.sigmoid(logits) > 0.5).float(), y).flatten().tolist()
    assert scores[config.target] == pytest.approx(expected, abs=1e-6)
    assert scores != source_scores.method_scores(tmp_path, study, "transfer", load)


def test_method_at_rest_follows_extend_from_to_weights_trained_further(tmp_path) -> None:
    spec = mini_study(tmp_path, ["transfer"], 1, [1], 1)
    run_experiment(spec, Paths(Path(".")), quiet=True, figures=False)
    steps = source_scores.Study.from_file(spec).config.meta.pretrain_steps
    text = spec.read_text().replace('name = "mini"', 'name = "mini_more"\nextend_from = "mini"')
    more = spec.with_name("mini_more.toml")
    more.write_text(text + f"meta = {{ pretrain_steps = {steps + 2} }}\n")
    run_experiment(more, Paths(Path(".")), quiet=True, figures=False)
    more.with_name("mini_more_tta.toml").write_text(
        more.read_text().replace('name = "mini_more"\nextend_from = "mini"',
                                 'name = "mini_more_tta"\ntrain_from = "mini_more"')
        .replace("draws = 1 }", "draws = 1, tta = true }"))
    study = source_scores.load_studies(tmp_path, ["mini"])[0]
    config = study.config

    def load(name):
        return load_arrays(name, config.data.resolution, data_root=None,
                           cache_dir=tmp_path / "cache")

    def own(runs: str, tta: bool) -> list[float]:
        checkpoint = load_checkpoint(tmp_path / "runs" / runs / "transfer")
        x, y = test_pool(load(config.target), test_fraction=config.data.test_fraction,
                         split_seed=config.data.split_seed)
        logits = predict_logits(build_model(checkpoint.config.model), checkpoint.theta, x,
                                torch.device("cpu"), tta=tta)
        return dice((torch.sigmoid(logits) > 0.5).float(), y).flatten().tolist()

    # transfer@more: mini_more's own weights (2 steps further), not mini's.
    scores = source_scores.method_scores(tmp_path, study, "transfer@more", load)
    assert scores[config.target] == pytest.approx(own("mini_more", False), abs=1e-6)
    assert scores != source_scores.method_scores(tmp_path, study, "transfer", load)
    # transfer@more_tta: mini_more's weights again, through train_from then extend_from.
    scores = source_scores.method_scores(tmp_path, study, "transfer@more_tta", load)
    assert scores[config.target] == pytest.approx(own("mini_more", True), abs=1e-6)
    # A study not derived from mini is refused, naming the chain it found.
    spec.with_name("mini_apart.toml").write_text(spec.read_text().replace('"mini"', '"mini_apart"'))
    with pytest.raises(ConfigError, match="found mini_apart"):
        source_scores.method_scores(tmp_path, study, "transfer@apart", load)
