import pytest
import torch

from imaml_seg.checkpoint import (
    Checkpoint,
    CheckpointError,
    blend_with_start,
    load_checkpoint,
    save_checkpoint,
)
from imaml_seg.config import ConfigError, ModelConfig, RunConfig, merge
from imaml_seg.model import build_model, get_params

TINY = RunConfig(model=ModelConfig(features=(2, 2, 4, 4, 8, 2)))


def make() -> Checkpoint:
    torch.manual_seed(0)
    theta = get_params(build_model(TINY.model))
    m = {k: torch.randn_like(v) for k, v in theta.items()}
    return Checkpoint(TINY, theta, step=7, optimizer_state={"m": m}, state={"phase": "meta"})


def test_round_trip_keeps_everything(tmp_path) -> None:
    ckpt = make()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    back = load_checkpoint(path)
    assert back.config == TINY
    assert back.step == 7 and back.state == {"phase": "meta"}
    for k in ckpt.theta:
        assert torch.equal(back.theta[k], ckpt.theta[k])
        assert torch.equal(back.optimizer_state["m"][k], ckpt.optimizer_state["m"][k])
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an imaml-seg checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_truncated_checkpoint_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", make())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_checkpoint(path)


def test_other_architecture_is_refused(tmp_path) -> None:
    ckpt = make()
    wrong = Checkpoint(RunConfig(model=ModelConfig(features=(4, 4, 4, 4, 8, 4))), ckpt.theta)
    path = save_checkpoint(tmp_path / "w.safetensors", wrong)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(path)


def test_nan_weights_are_refused(tmp_path) -> None:
    ckpt = make()
    name = next(iter(ckpt.theta))
    ckpt.theta[name][...] = float("nan")
    path = save_checkpoint(tmp_path / "n.safetensors", ckpt)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def test_blend_with_start_mixes_in_the_warm_start_by_its_fraction(tmp_path) -> None:
    theta = {k: torch.zeros_like(v) for k, v in make().theta.items()}
    start = save_checkpoint(
        tmp_path / "start.safetensors", Checkpoint(TINY, {k: torch.ones_like(v) + 3 for k, v in
                                                          theta.items()})
    )
    warm = merge(TINY, {"meta": {"warm_start": str(start)}})
    assert blend_with_start(theta, warm) is theta  # start_blend = 0: the weights as learned
    quarter = blend_with_start(theta, merge(warm, {"eval": {"start_blend": 0.25}}))
    assert all(torch.equal(v, torch.full_like(v, 1.0)) for v in quarter.values())  # 0.75 0 + 0.25 4
    whole = blend_with_start(theta, merge(warm, {"eval": {"start_blend": 1.0}}))
    assert all(torch.equal(v, torch.full_like(v, 4.0)) for v in whole.values())
    with pytest.raises(ConfigError, match="meta.warm_start is unset"):
        blend_with_start(theta, merge(TINY, {"eval": {"start_blend": 0.5}}))
    gone = merge(warm, {"meta": {"warm_start": str(tmp_path / "gone.safetensors")},
                        "eval": {"start_blend": 0.5}})
    with pytest.raises(CheckpointError, match="gone.safetensors: checkpoint not found"):
        blend_with_start(theta, gone)
    other = RunConfig(model=ModelConfig(features=(4, 4, 4, 4, 8, 4)))
    torch.manual_seed(0)
    odd = save_checkpoint(tmp_path / "odd.safetensors",
                          Checkpoint(other, get_params(build_model(other.model))))
    mismatch = merge(warm, {"meta": {"warm_start": str(odd)}, "eval": {"start_blend": 0.5}})
    with pytest.raises(CheckpointError, match="odd.safetensors: the warm start's weights do not"):
        blend_with_start(theta, mismatch)



def test_learned_strengths_round_trip_and_damaged_ones_are_refused(tmp_path) -> None:
    ckpt = make()
    ckpt.lam = {k: torch.tensor(0.5 + i) for i, k in enumerate(ckpt.theta)}
    back = load_checkpoint(save_checkpoint(tmp_path / "c.safetensors", ckpt))
    assert list(back.lam) == list(back.theta)
    assert all(torch.equal(back.lam[k], ckpt.lam[k]) for k in ckpt.lam)
    assert load_checkpoint(save_checkpoint(tmp_path / "plain.safetensors", make())).lam == {}
    first = next(iter(ckpt.theta))
    for name, lam, message in [
        ("partial", {first: torch.tensor(1.0)}, "one scalar per weight tensor"),
        ("negative", {**ckpt.lam, first: torch.tensor(-1.0)}, "not a positive number"),
    ]:
        damaged = Checkpoint(TINY, ckpt.theta, lam=lam)
        path = save_checkpoint(tmp_path / f"{name}.safetensors", damaged)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: .*{message}"):
            load_checkpoint(path)
