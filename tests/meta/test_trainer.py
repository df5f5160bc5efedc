"""The meta-training loop: SIGKILL + --resume reproduces an uninterrupted run; bad tasks skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml_seg.checkpoint import load_checkpoint
from imaml_seg.config import ConfigError, RunConfig, load, merge
from imaml_seg.meta import trainer
from imaml_seg.meta.algorithms import MetaGradResult
from imaml_seg.meta.trainer import Paths, read_log, train

TINY = Path(__file__).parents[1] / "fixtures" / "tiny.toml"
STEPS = 8


def cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imaml_seg",
        "meta-train",
        "--config",
        str(TINY),
        "--meta-steps",
        str(STEPS),
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path) -> None:
    subprocess.run(cli(tmp_path / "whole"), check=True, env=env())
    ckpt = tmp_path / "killed" / "checkpoint.safetensors"
    proc = subprocess.Popen(cli(tmp_path / "killed"), env=env())
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = load_checkpoint(ckpt).step
            if 2 <= step < STEPS - 1:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed mid-way"
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(ckpt).step < STEPS
    subprocess.run(cli(tmp_path / "killed", "--resume"), check=True, env=env())
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.safetensors")
    resumed = load_checkpoint(ckpt)
    assert resumed.step == whole.step == STEPS
    for name, value in whole.theta.items():
        torch.testing.assert_close(resumed.theta[name], value, rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_log(tmp_path / "killed" / "log.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice after the resume
    assert (tmp_path / "killed" / "learning_curve.png").is_file()


def test_failed_tasks_are_skipped_counted_and_never_reach_theta(tmp_path, monkeypatch) -> None:
    real = trainer.meta_gradient
    calls = {"n": 0}

    def flaky(algorithm, model, theta, task, config, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 1:  # every other task "diverges"
            nan = {k: torch.full_like(v, float("nan")) for k, v in theta.items()}
            return MetaGradResult(
                nan, float("nan"), float("nan"), {"cg_status": "nonfinite"}, False
            )
        return real(algorithm, model, theta, task, config, **kwargs)

    monkeypatch.setattr(trainer, "meta_gradient", flaky)
    config = merge(load(TINY), {"meta": {"meta_steps": 3, "val_every": 0}})
    path = train(config, Paths(tmp_path), quiet=True)
    theta = load_checkpoint(path).theta
    assert all(torch.isfinite(v).all() for v in theta.values())
    log = read_log(tmp_path / "log.jsonl")
    assert [r["skipped"] for r in log] == [1, 1, 1] and [r["tasks"] for r in log] == [1, 1, 1]


def test_all_tasks_failing_leaves_theta_unchanged(tmp_path, monkeypatch) -> None:
    def broken(algorithm, model, theta, task, config, **kwargs):
        nan = {k: torch.full_like(v, float("nan")) for k, v in theta.items()}
        return MetaGradResult(nan, float("nan"), float("nan"), {}, False)

    monkeypatch.setattr(trainer, "meta_gradient", broken)
    config = merge(load(TINY), {"meta": {"meta_steps": 2, "val_every": 0}})
    theta = load_checkpoint(train(config, Paths(tmp_path), quiet=True)).theta
    start = trainer.init_theta(config, torch.device("cpu"))
    for name in theta:
        assert torch.equal(theta[name], start[name])


def test_a_finished_run_extended_to_more_steps_matches_one_longer_run(tmp_path) -> None:
    config = merge(load(TINY), {"meta": {"meta_steps": 4, "val_every": 2}})
    longer = merge(config, {"meta": {"meta_steps": 6}})
    whole = load_checkpoint(train(longer, Paths(tmp_path / "whole"), quiet=True))
    train(config, Paths(tmp_path / "ext"), quiet=True)
    extended = load_checkpoint(train(longer, Paths(tmp_path / "ext"), resume=True, quiet=True))
    assert extended.step == whole.step == 6 and extended.config == longer
    assert extended.state["done"]
    for name, value in whole.theta.items():
        torch.testing.assert_close(extended.theta[name], value, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_log(tmp_path / "ext" / "log.jsonl")] == list(range(1, 7))
    assert '"meta_steps": 6' in (tmp_path / "ext" / "config.json").read_text()


def test_resume_with_other_settings_keeps_the_checkpoints_own(tmp_path) -> None:
    config = merge(load(TINY), {"meta": {"meta_steps": 2, "val_every": 0}})
    train(config, Paths(tmp_path), quiet=True)
    shorter = merge(config, {"meta": {"meta_steps": 1}})
    other_lr = merge(config, {"meta": {"meta_steps": 3, "meta_lr": 0.5}})
    assert not trainer.extends(config, shorter) and not trainer.extends(config, other_lr)
    assert trainer.extends(config, merge(config, {"meta": {"pretrain_steps": 99}}))
    # Test-time settings are not training's: a zero-shot study may continue a preset one.
    assert trainer.extends(config, merge(config, {"eval": {"inner_steps": 0}}))
    # Nor is the budget of the other phase: transfer trains pretrain_steps, the rest meta_steps.
    assert trainer.extends(config, merge(config, {"meta": {"pretrain_steps": 1}}))
    transfer = merge(config, {"meta": {"algorithm": "transfer", "pretrain_steps": 5}})
    assert trainer.extends(transfer, merge(transfer, {"meta": {"meta_steps": 1}}))
    assert not trainer.extends(transfer, merge(transfer, {"meta": {"pretrain_steps": 4}}))
    # Transfer does not read the meta-objective's start term; the meta-learners do.
    assert trainer.extends(transfer, merge(transfer, {"meta": {"start_weight": 1.0}}))
    assert not trainer.extends(config, merge(config, {"meta": {"start_weight": 1.0}}))
    with pytest.warns(UserWarning, match="checkpoint's own config"):
        ckpt = load_checkpoint(train(other_lr, Paths(tmp_path), resume=True, quiet=True))
    assert ckpt.step == 2 and ckpt.config == config


def test_clip_grad_norm_rescales_only_above_the_limit() -> None:
    grad = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # global norm 5
    clipped, norm = trainer.clip_grad_norm(grad, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))
    for limit in (5.0, 10.0, None):
        same, norm = trainer.clip_grad_norm(grad, limit)
        assert norm == pytest.approx(5.0) and same is grad


def test_max_grad_norm_bounds_every_outer_step(tmp_path, monkeypatch) -> None:
    """The log holds each outer gradient's norm before clipping; Adam gets it rescaled to
    ``max_grad_norm`` when larger."""
    seen = []
    real = trainer.OuterAdam.step

    def spy(self, theta, grad, state, t):
        seen.append(trainer.clip_grad_norm(grad, None)[1])
        return real(self, theta, grad, state, t)

    monkeypatch.setattr(trainer.OuterAdam, "step", spy)
    config = merge(load(TINY), {"meta": {"meta_steps": 3, "val_every": 0}})
    train(config, Paths(tmp_path / "free"), quiet=True)
    free = [r["grad_norm"] for r in read_log(tmp_path / "free" / "log.jsonl")]
    assert seen == pytest.approx(free) and all(n > 0 for n in free)
    limit = min(free) / 2
    seen.clear()
    train(merge(config, {"meta": {"max_grad_norm": limit}}), Paths(tmp_path / "clip"), quiet=True)
    logged = [r["grad_norm"] for r in read_log(tmp_path / "clip" / "log.jsonl")]
    assert logged[0] == pytest.approx(free[0])  # the norm before clipping is what is logged
    assert seen == pytest.approx([limit] * 3)


def test_start_weight_logs_the_starts_query_loss(tmp_path) -> None:
    """With ``meta.start_weight`` each meta-step logs the start's mean query loss, and the
    outer steps differ from the plain objective's; without it the log has no such field."""
    config = merge(load(TINY), {"meta": {"meta_steps": 2, "val_every": 0}})
    plain = load_checkpoint(train(config, Paths(tmp_path / "plain"), quiet=True)).theta
    weighted = merge(config, {"meta": {"start_weight": 1.0}})
    theta = load_checkpoint(train(weighted, Paths(tmp_path / "start"), quiet=True)).theta
    logged = read_log(tmp_path / "start" / "log.jsonl")
    assert all(r["start_query_loss"] > 0 for r in logged) and len(logged) == 2
    assert all("start_query_loss" not in r for r in read_log(tmp_path / "plain" / "log.jsonl"))
    assert any(not torch.equal(theta[k], plain[k]) for k in theta)


def test_average_from_ships_the_mean_of_the_last_meta_steps(tmp_path) -> None:
    """``meta.average_from = 3`` of 4 steps ships the mean of the weights after steps 3 and 4;
    the last step's own weights stay in the optimiser state, and the run extended to 6 steps
    equals one 6-step averaged run (the mean over steps 3 to 6)."""
    config = merge(load(TINY), {"meta": {"meta_steps": 3, "val_every": 0}})
    third = load_checkpoint(train(config, Paths(tmp_path / "plain"), quiet=True)).theta
    longer = merge(config, {"meta": {"meta_steps": 4}})
    fourth = load_checkpoint(train(longer, Paths(tmp_path / "plain"), resume=True, quiet=True))
    averaged = merge(longer, {"meta": {"average_from": 3, "val_every": 4}})
    ckpt = load_checkpoint(train(averaged, Paths(tmp_path / "avg"), quiet=True))
    for name, value in ckpt.theta.items():
        torch.testing.assert_close(value, (third[name] + fourth.theta[name]) / 2)
        torch.testing.assert_close(ckpt.optimizer_state["raw"][name], fourth.theta[name])
    assert any(not torch.equal(ckpt.theta[k], fourth.theta[k]) for k in ckpt.theta)
    assert 0 <= read_log(tmp_path / "avg" / "log.jsonl")[-1]["val_dice_average"] <= 1
    # A plain 2-step run continued to the averaged one (train, then average) reaches its mean.
    two = merge(averaged, {"meta": {"meta_steps": 2, "average_from": 0}})
    train(two, Paths(tmp_path / "then"), quiet=True)
    then = load_checkpoint(train(averaged, Paths(tmp_path / "then"), resume=True, quiet=True))
    for name, value in ckpt.theta.items():
        torch.testing.assert_close(then.theta[name], value, rtol=1e-5, atol=1e-6)

    six = merge(averaged, {"meta": {"meta_steps": 6}})
    whole = load_checkpoint(train(six, Paths(tmp_path / "whole"), quiet=True))
    extended = load_checkpoint(train(six, Paths(tmp_path / "avg"), resume=True, quiet=True))
    assert extended.step == whole.step == 6
    for name, value in whole.theta.items():
        torch.testing.assert_close(extended.theta[name], value, rtol=1e-5, atol=1e-6)


def test_average_from_is_a_meta_learner_setting(tmp_path) -> None:
    """Transfer ignores ``average_from`` (a study may continue its plain run); a meta-learner's
    run with another value is another run."""
    config = merge(load(TINY), {"meta": {"meta_steps": 4}})
    transfer = merge(config, {"meta": {"algorithm": "transfer"}})
    assert trainer.extends(transfer, merge(transfer, {"meta": {"average_from": 2}}))
    assert not trainer.extends(config, merge(config, {"meta": {"average_from": 2}}))
    # A plain run may go on to average steps it has not trained (train, then average more).
    more = merge(config, {"meta": {"meta_steps": 6}})
    assert trainer.extends(config, merge(more, {"meta": {"average_from": 5}}))
    assert not trainer.extends(config, merge(more, {"meta": {"average_from": 4}}))
    averaged = merge(more, {"meta": {"average_from": 5}})
    assert not trainer.extends(averaged, merge(more, {"meta": {"meta_steps": 8}}))
    with pytest.raises(ConfigError, match="average_from"):
        merge(config, {"meta": {"average_from": 5}})


def test_pretrain_average_from_averages_transfer(tmp_path) -> None:
    """Transfer's ``pretrain_average_from = 3`` of 4 pretraining steps ships the mean of its
    weights after steps 3 and 4, and a plain 2-step transfer run continued to it reaches the
    same mean; the meta-learners do not read the setting."""
    config = merge(
        load(TINY), {"meta": {"algorithm": "transfer", "pretrain_steps": 3, "val_every": 0}}
    )
    third = load_checkpoint(train(config, Paths(tmp_path / "plain"), quiet=True)).theta
    longer = merge(config, {"meta": {"pretrain_steps": 4}})
    fourth = load_checkpoint(train(longer, Paths(tmp_path / "plain"), resume=True, quiet=True))
    averaged = merge(longer, {"meta": {"pretrain_average_from": 3}})
    ckpt = load_checkpoint(train(averaged, Paths(tmp_path / "avg"), quiet=True))
    for name, value in ckpt.theta.items():
        torch.testing.assert_close(value, (third[name] + fourth.theta[name]) / 2)
        torch.testing.assert_close(ckpt.optimizer_state["raw"][name], fourth.theta[name])
    assert any(not torch.equal(ckpt.theta[k], fourth.theta[k]) for k in ckpt.theta)

    two = merge(averaged, {"meta": {"pretrain_steps": 2, "pretrain_average_from": 0}})
    assert trainer.extends(two, averaged) and not trainer.extends(config, averaged)
    train(two, Paths(tmp_path / "then"), quiet=True)
    then = load_checkpoint(train(averaged, Paths(tmp_path / "then"), resume=True, quiet=True))
    for name, value in ckpt.theta.items():
        torch.testing.assert_close(then.theta[name], value, rtol=1e-5, atol=1e-6)

    meta = merge(load(TINY), {"meta": {"meta_steps": 4}})
    assert trainer.extends(meta, merge(meta, {"meta": {"pretrain_average_from": 2}}))
    with pytest.raises(ConfigError, match="pretrain_average_from"):
        merge(config, {"meta": {"pretrain_average_from": 4}})


def test_lam_lr_learns_one_strength_per_tensor_and_resumes(tmp_path) -> None:
    """``meta.lam_lr`` moves each tensor's strength from ``inner.lam`` within its bounds; the
    strengths travel in the checkpoint (with their Adam state), so a run extended from 2 to 4
    steps equals one 4-step run, and evaluation adapts with them."""
    from imaml_seg.cli import method_for

    config = merge(load(TINY), {"meta": {"meta_steps": 4, "val_every": 2, "lam_lr": 0.2}})
    ckpt = load_checkpoint(train(config, Paths(tmp_path / "whole"), quiet=True))
    assert list(ckpt.lam) == list(ckpt.theta)
    values = torch.stack(list(ckpt.lam.values()))
    assert values.min() >= config.meta.lam_max / 1e4 and values.max() <= config.meta.lam_max
    assert len(set(values.tolist())) > 1 and not torch.allclose(values, torch.tensor(2.0))
    last = read_log(tmp_path / "whole" / "log.jsonl")[-1]
    assert last["lam_lo"] == pytest.approx(float(values.min()))
    assert last["lam_hi"] == pytest.approx(float(values.max()))

    two = merge(config, {"meta": {"meta_steps": 2}})
    assert load_checkpoint(train(two, Paths(tmp_path / "ext"), quiet=True)).lam
    extended = load_checkpoint(train(config, Paths(tmp_path / "ext"), resume=True, quiet=True))
    for name in ckpt.theta:
        torch.testing.assert_close(extended.theta[name], ckpt.theta[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(extended.lam[name], ckpt.lam[name], rtol=1e-5, atol=1e-6)

    method = method_for(ckpt, "imaml")
    assert method.lam is not None and all(torch.equal(method.lam[k], ckpt.lam[k]) for k in ckpt.lam)
    plain = merge(load(TINY), {"meta": {"meta_steps": 4, "val_every": 0}})
    assert load_checkpoint(train(plain, Paths(tmp_path / "plain"), quiet=True)).lam == {}


def test_lam_lr_is_an_imaml_setting_within_stable_bounds(tmp_path) -> None:
    """MAML refuses learned strengths; transfer ignores them, so a study's warm-start transfer
    with ``lam_lr`` set continues a plain transfer run and learns none."""
    config = load(TINY)
    with pytest.raises(ConfigError, match="iMAML setting"):
        merge(config, {"meta": {"algorithm": "maml", "lam_lr": 0.1}})
    transfer = merge(config, {"meta": {"algorithm": "transfer", "pretrain_steps": 2}})
    learned = merge(transfer, {"meta": {"lam_lr": 0.1}})
    assert trainer.extends(transfer, learned)
    assert not trainer.extends(config, merge(config, {"meta": {"lam_lr": 0.1}}))
    assert load_checkpoint(train(learned, Paths(tmp_path), quiet=True)).lam == {}
    with pytest.raises(ConfigError, match="lam_max"):
        merge(config, {"meta": {"lam_lr": 0.1, "lam_max": 25.0}})
    with pytest.raises(ConfigError, match="lam_max"):
        merge(config, {"meta": {"lam_lr": 0.1, "lam_max": 1.0}})


def test_task_shift_for_meta_learners_pretrain_shift_for_transfer(tmp_path) -> None:
    """``task_shift`` changes what a meta-learner trains on and transfer ignores it (a shifted
    study's warm start continues plain transfer); ``pretrain_shift`` is the reverse."""
    meta = merge(load(TINY), {"meta": {"meta_steps": 2, "val_every": 0}})
    transfer = merge(meta, {"meta": {"algorithm": "transfer", "pretrain_steps": 2}})
    assert trainer.extends(transfer, merge(transfer, {"meta": {"task_shift": 0.5}}))
    assert trainer.extends(meta, merge(meta, {"meta": {"pretrain_shift": 0.5}}))
    assert not trainer.extends(meta, merge(meta, {"meta": {"task_shift": 0.5}}))
    assert not trainer.extends(transfer, merge(transfer, {"meta": {"pretrain_shift": 0.5}}))

    def weights(config: RunConfig, name: str) -> dict[str, torch.Tensor]:
        return load_checkpoint(train(config, Paths(tmp_path / name), quiet=True)).theta

    for config, key in ((meta, "task_shift"), (transfer, "pretrain_shift")):
        plain = weights(config, f"{key}_plain")
        shifted = weights(merge(config, {"meta": {key: 1.0}}), f"{key}_on")
        assert any(not torch.equal(plain[k], shifted[k]) for k in plain)
        other = "pretrain_shift" if key == "task_shift" else "task_shift"
        ignored = weights(merge(config, {"meta": {other: 1.0}}), f"{key}_ignored")
        assert all(torch.equal(plain[k], ignored[k]) for k in plain)
    for key in ("task_shift", "pretrain_shift"):
        with pytest.raises(ConfigError, match=rf"meta.{key} must be in \[0, 1\]"):
            merge(meta, {"meta": {key: 1.5}})
