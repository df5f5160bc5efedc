"""The command line as a user meets it: outputs, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imaml_seg.cli import main
from tests.data.datafiles import generic_tree

TINY = str(Path(__file__).parent / "fixtures" / "tiny.toml")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["meta-train", "--config", TINY, "--out", str(out), "-q"]) == 0
    return out / "checkpoint.safetensors"


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_datasets_lists_the_real_data(real_data_root, capsys) -> None:
    assert main(["datasets", "--data-root", str(real_data_root), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    counts = {name: rows[name]["pairs"] for name in rows}
    assert counts == {"Kvasir-SEG": 1000, "CVC-ClinicDB": 612, "ISIC2018": 1297, "DRIVE": 40}
    assert main(["datasets", "--data-root", str(real_data_root)]) == 0
    text = capsys.readouterr().out
    assert "Kvasir-SEG" in text and "1297" in text


def test_meta_train_refuses_to_overwrite_a_run(tiny_model, capsys) -> None:
    err = error_of(capsys, ["meta-train", "--config", TINY, "--out", str(tiny_model.parent), "-q"])
    assert "--resume" in err and str(tiny_model.parent) in err


def test_adapt_then_predict_writes_masks_overlays_and_areas(tiny_model, tmp_path, capsys) -> None:
    support = generic_tree(tmp_path / "support", n=3, h=40, w=52)
    images = generic_tree(tmp_path / "new", n=2, h=30, w=44) / "images"
    adapted = tmp_path / "adapted.safetensors"
    assert (
        main(
            [
                "adapt",
                "--model",
                str(tiny_model),
                "--support",
                str(support),
                "--out",
                str(adapted),
                "-q",
            ]
        )
        == 0
    )
    out = tmp_path / "pred"
    assert (
        main(["predict", "--model", str(adapted), "--images", str(images), "--out", str(out), "-q"])
        == 0
    )
    for stem in ("case0", "case1"):
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (30, 44) and set(np.unique(mask)) <= {0, 255}
        assert (out / "overlays" / f"{stem}.png").is_file()
    rows = list(csv.DictReader(open(out / "areas.csv")))
    assert [r["image"] for r in rows] == ["case0.png", "case1.png"]
    assert all(0 <= float(r["lesion_fraction"]) <= 1 for r in rows)
    # A second run must not overwrite without being asked ...
    before = (out / "masks" / "case0.png").stat().st_mtime_ns
    err = error_of(
        capsys,
        ["predict", "--model", str(adapted), "--images", str(images), "--out", str(out), "-q"],
    )
    assert "--overwrite" in err and (out / "masks" / "case0.png").stat().st_mtime_ns == before
    # ... and does with --overwrite.
    assert (
        main(
            [
                "predict",
                "--model",
                str(adapted),
                "--images",
                str(images),
                "--out",
                str(out),
                "--overwrite",
                "-q",
            ]
        )
        == 0
    )
    # adapt refuses to replace its output too.
    assert "--overwrite" in error_of(
        capsys,
        [
            "adapt",
            "--model",
            str(tiny_model),
            "--support",
            str(support),
            "--out",
            str(adapted),
            "-q",
        ],
    )


def test_predict_refuses_output_inside_input_and_bad_images(tiny_model, tmp_path, capsys) -> None:
    images = generic_tree(tmp_path / "set", n=2) / "images"
    err = error_of(
        capsys,
        [
            "predict",
            "--model",
            str(tiny_model),
            "--images",
            str(images),
            "--out",
            str(images / "out"),
            "-q",
        ],
    )
    assert "inside the input folder" in err
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    err = error_of(
        capsys,
        [
            "predict",
            "--model",
            str(tiny_model),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ],
    )
    assert "broken.png" in err
    assert not (tmp_path / "o").exists()  # nothing written when an input is bad


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 5])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, content) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    images = generic_tree(tmp_path / "set", n=1) / "images"
    err = error_of(
        capsys,
        [
            "predict",
            "--model",
            str(bad),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ],
    )
    assert "model.safetensors" in err


def test_bad_support_folder_and_missing_data_root(
    tiny_model, tmp_path, capsys, monkeypatch
) -> None:
    support = generic_tree(tmp_path / "support", n=2)
    (support / "masks" / "case1.png").unlink()
    err = error_of(
        capsys,
        [
            "adapt",
            "--model",
            str(tiny_model),
            "--support",
            str(support),
            "--out",
            str(tmp_path / "a.safetensors"),
            "-q",
        ],
    )
    assert "case1" in err
    monkeypatch.delenv("IMAML_SEG_DATA", raising=False)
    assert "--data-root" in error_of(capsys, ["datasets"])


def test_predict_refuses_existing_outputs_before_adapting(tiny_model, tmp_path, capsys) -> None:
    images = generic_tree(tmp_path / "new", n=2) / "images"
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tiny_model), "--images", str(images), "--out",
                 str(out), "-q"]) == 0
    support = generic_tree(tmp_path / "support", n=2)
    (support / "masks" / "case1.png").unlink()  # adapting would fail on this
    err = error_of(capsys, ["predict", "--model", str(tiny_model), "--support", str(support),
                            "--images", str(images), "--out", str(out), "-q"])
    assert "--overwrite" in err and "case1" not in err


def test_evaluate_json_reports_per_draw_scores(tiny_model, capsys) -> None:
    assert main(["evaluate", str(tiny_model), "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["records"]) == 2  # 1 shot count x 2 draws
    assert all(0 <= r["dice"] <= 1 for r in out["records"])


def test_every_command_has_help_with_an_example(capsys) -> None:
    for command in ("datasets", "meta-train", "evaluate", "adapt", "predict", "demo", "experiment"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "example:" in capsys.readouterr().out


def test_the_shipped_model_adapts_and_predicts_without_meta_training(tmp_path) -> None:
    from imaml_seg.cli import resolve_model

    shipped = resolve_model("shipped")
    assert shipped.config.meta.algorithm == "imaml" and shipped.config.meta.warm_start
    assert set(shipped.config.sources) == {"Kvasir-SEG", "CVC-ClinicDB", "ISIC2018", "DRIVE"}
    support = generic_tree(tmp_path / "support", n=3, h=48, w=64)
    images = generic_tree(tmp_path / "new", n=2, h=48, w=64) / "images"
    out = tmp_path / "pred"
    assert main(["predict", "--support", str(support), "--images", str(images), "--out",
                 str(out), "--inner-steps", "3", "-q"]) == 0
    assert len(list((out / "masks").glob("*.png"))) == 2


def test_test_time_flags_reach_the_adapted_checkpoint_and_predictions(tiny_model, tmp_path,
                                                                       capsys) -> None:
    from imaml_seg.checkpoint import load_checkpoint

    support = generic_tree(tmp_path / "support", n=2, h=40, w=52)
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(adapted), "--optimizer", "adam", "--inner-lr", "0.003", "--inner-steps", "2",
                 "--augment-support", "--tta", "-q"]) == 0
    ev = load_checkpoint(adapted).config.eval
    assert (ev.optimizer, ev.inner_lr, ev.inner_steps, ev.augment_support, ev.tta) == (
        "adam", 0.003, 2, True, True
    )
    images = generic_tree(tmp_path / "new", n=1, h=30, w=44) / "images"
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    assert main(["predict", "--model", str(tiny_model), "--images", str(images), "--out",
                 str(plain), "-q"]) == 0
    assert main(["predict", "--model", str(tiny_model), "--images", str(images), "--out",
                 str(tta), "--tta", "-q"]) == 0
    rows = [next(csv.DictReader(open(p / "areas.csv"))) for p in (plain, tta)]
    assert rows[0]["image"] == rows[1]["image"] == "case0.png"
    assert main(["evaluate", str(tiny_model), "--json", "--tta", "--augment-support", "-q"]) == 0
    assert len(json.loads(capsys.readouterr().out)["records"]) == 2


def test_predict_refuses_adaptation_settings_without_a_support_set(tiny_model, tmp_path,
                                                                  capsys) -> None:
    images = generic_tree(tmp_path / "new", n=1, h=30, w=44) / "images"
    err = error_of(capsys, ["predict", "--model", str(tiny_model), "--images", str(images),
                            "--out", str(tmp_path / "out"), "--inner-steps", "5",
                            "--augment-support", "-q"])
    assert "--inner-steps --augment-support: only with --support" in err
    assert not (tmp_path / "out").exists()


def test_support_cv_flag_chooses_and_records_the_adaptation_steps(tiny_model, tmp_path,
                                                                  capsys) -> None:
    from imaml_seg.checkpoint import load_checkpoint

    support = generic_tree(tmp_path / "support", n=3, h=40, w=52)
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(adapted), "--inner-steps", "4", "--support-cv"]) == 0
    assert "steps by support CV" in capsys.readouterr().out
    ckpt = load_checkpoint(adapted)
    assert ckpt.config.eval.support_cv and ckpt.state["inner_steps"] in (0, 1, 2, 4)
    assert ckpt.config.eval.support_cv_rule == "best"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(adapted), "--inner-steps", "4", "--support-cv", "one_se",
                 "--overwrite"]) == 0
    assert "steps by support CV, one-SE rule)" in capsys.readouterr().out
    assert load_checkpoint(adapted).config.eval.support_cv_rule == "one_se"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(adapted), "--inner-steps", "4", "--support-cv", "paired_se",
                 "--overwrite"]) == 0
    assert "steps by support CV, paired-SE rule)" in capsys.readouterr().out
    assert load_checkpoint(adapted).config.eval.support_cv_rule == "paired_se"
    assert main(["evaluate", str(tiny_model), "--json", "--support-cv", "--inner-steps", "2",
                 "--shots", "1", "2", "-q"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert {r["shots"]: r["inner_steps"] for r in records if r["shots"] == 1} == {1: 2}
    assert all(r["inner_steps"] in (0, 1, 2) for r in records)


def test_support_cv_on_one_image_says_it_could_not_choose(tiny_model, tmp_path, capsys) -> None:
    from imaml_seg.checkpoint import load_checkpoint

    support = generic_tree(tmp_path / "support", n=1, h=40, w=52)
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(adapted), "--inner-steps", "4", "--support-cv"]) == 0
    out, err = capsys.readouterr()
    assert f"{support} holds one labelled image" in err and "adapted 4 steps" in err
    assert "--inner-steps 0" in err and "by support CV" not in out
    assert load_checkpoint(adapted).state["inner_steps"] == 4


def test_start_blend_adapts_from_the_mix_with_the_warm_start_once(tiny_model, tmp_path,
                                                                   capsys) -> None:
    from dataclasses import replace

    import torch

    from imaml_seg.checkpoint import load_checkpoint, save_checkpoint
    from imaml_seg.config import merge

    start = load_checkpoint(tiny_model)
    warm = save_checkpoint(tmp_path / "warm.safetensors", replace(
        start, config=merge(start.config, {"meta": {"warm_start": str(tiny_model)}}),
        theta={k: v + 1 for k, v in start.theta.items()}))
    support = generic_tree(tmp_path / "support", n=2, h=40, w=52)
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", "--model", str(warm), "--support", str(support), "--out",
                 str(adapted), "--inner-steps", "0", "--start-blend", "0.5", "-q"]) == 0
    back = load_checkpoint(adapted)
    for k, v in start.theta.items():  # (1 - 0.5)(theta + 1) + 0.5 theta
        assert torch.allclose(back.theta[k], v + 0.5)
    # The saved weights are the mix already: the setting is recorded, not left to apply again.
    assert back.config.eval.start_blend == 0.0 and back.state["start_blend"] == 0.5
    images = generic_tree(tmp_path / "new", n=1, h=30, w=44) / "images"
    assert main(["predict", "--model", str(warm), "--images", str(images), "--out",
                 str(tmp_path / "pred"), "--start-blend", "0.5", "-q"]) == 0
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 1
    err = error_of(capsys, ["evaluate", str(tiny_model), "--start-blend", "0.5", "-q"])
    assert "meta.warm_start is unset" in err
    # A blend in the model's own config is applied too; blend_only_unadapted is refused.
    for only, name in ((False, "own"), (True, "only")):
        save_checkpoint(tmp_path / f"{name}.safetensors", replace(
            load_checkpoint(warm), config=merge(load_checkpoint(warm).config, {
                "eval": {"start_blend": 0.5, "blend_only_unadapted": only}})))
    assert main(["adapt", "--model", str(tmp_path / "own.safetensors"), "--support",
                 str(support), "--out", str(tmp_path / "own_adapted.safetensors"),
                 "--inner-steps", "0", "-q"]) == 0
    own = load_checkpoint(tmp_path / "own_adapted.safetensors").theta
    assert all(torch.allclose(own[k], back.theta[k]) for k in own)
    err = error_of(capsys, ["evaluate", str(tmp_path / "only.safetensors"), "-q"])
    assert "blend_only_unadapted (in the model's config) is a study setting" in err
    err = error_of(capsys, ["evaluate", str(warm), "--start-blend", "2", "-q"])
    assert "eval.start_blend must be in [0, 1]" in err


def test_proximal_flag_reaches_the_adapted_checkpoint_and_needs_a_support_set(
    tiny_model, tmp_path, capsys
) -> None:
    from imaml_seg.checkpoint import load_checkpoint

    support = generic_tree(tmp_path / "support", n=2, h=40, w=52)
    for flag, kept in (("--proximal", True), ("--no-proximal", False)):
        adapted = tmp_path / f"adapted{flag}.safetensors"
        assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                     str(adapted), "--inner-steps", "2", flag, "-q"]) == 0
        assert load_checkpoint(adapted).config.eval.proximal is kept
    images = generic_tree(tmp_path / "new", n=1, h=30, w=44) / "images"
    err = error_of(capsys, ["predict", "--model", str(tiny_model), "--images", str(images),
                            "--out", str(tmp_path / "out"), "--no-proximal", "-q"])
    assert "--no-proximal: only with --support" in err


def test_no_support_cv_turns_off_a_models_own_support_cv(tiny_model, tmp_path, capsys) -> None:
    from imaml_seg.checkpoint import load_checkpoint

    support = generic_tree(tmp_path / "support", n=2, h=40, w=52)
    with_cv, without = tmp_path / "cv.safetensors", tmp_path / "plain.safetensors"
    assert main(["adapt", "--model", str(tiny_model), "--support", str(support), "--out",
                 str(with_cv), "--inner-steps", "2", "--support-cv", "-q"]) == 0
    assert load_checkpoint(with_cv).config.eval.support_cv
    assert main(["adapt", "--model", str(with_cv), "--support", str(support), "--out",
                 str(without), "--no-support-cv", "-q"]) == 0
    assert not load_checkpoint(without).config.eval.support_cv
    err = error_of(capsys, ["adapt", "--model", str(tiny_model), "--support", str(support),
                            "--out", str(tmp_path / "x.safetensors"), "--support-cv",
                            "--no-support-cv", "-q"])
    assert "--support-cv and --no-support-cv: choose one" in err
