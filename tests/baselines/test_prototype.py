"""PANet-style prototype baseline: pooling by hand, shapes, invariances, learning, round trip."""

from __future__ import annotations

import math

import pytest
import torch

from imaml_seg.baselines import build_baseline
from imaml_seg.baselines.prototype import PrototypeNet, masked_average_pool, shot_prototype


def test_masked_average_pool_matches_hand_computation() -> None:
    # one image, 2 channels, 2x2 pixels
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # channel 0: (1 + 4) / 2 = 2.5; channel 1: (0 + 1) / 2 = 0.5
    got = masked_average_pool(features, mask, eps=0.0)
    assert torch.allclose(got, torch.tensor([[2.5, 0.5]]))
    # soft weights: (0.5 * 2 + 0.25 * 3) / 0.75 = 7/3 and (0.5 * 1 + 0) / 0.75 = 2/3
    soft = torch.tensor([[[[0.0, 0.5], [0.25, 0.0]]]])
    got = masked_average_pool(features, soft, eps=0.0)
    assert torch.allclose(got, torch.tensor([[7 / 3, 2 / 3]]))
    # eps keeps an empty mask finite: its pooled vector is zero
    assert torch.equal(masked_average_pool(features, torch.zeros_like(mask)), torch.zeros(1, 2))


def test_shot_prototype_averages_shots_and_skips_empty_ones() -> None:
    features = torch.stack(
        [
            torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]),
            torch.tensor([[[5.0, 5.0], [7.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]),
            torch.full((2, 2, 2), 100.0),
        ]
    )
    masks = torch.tensor(
        [[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]
    )
    # shot 1: (2.5, 0.5); shot 2: (7, 2); shot 3 empty, left out -> mean (4.75, 1.25)
    got = shot_prototype(features, masks, eps=1e-12)
    assert torch.allclose(got, torch.tensor([4.75, 1.25]))
    assert torch.equal(shot_prototype(features, torch.zeros_like(masks)), torch.zeros(2))


def test_support_mask_is_area_downsampled_to_feature_size() -> None:
    features = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0  # exactly the top-left feature cell
    mask[..., 2:, 2:3] = 1.0  # half of the bottom-right cell (weight 0.5)
    fg, bg = PrototypeNet.prototypes(features, mask)
    # fg = (f[0,0] + 0.5 f[1,1]) / 1.5 = (0 + 1.5) / 1.5, (4 + 3.5) / 1.5
    # bg = (f[0,1] + f[1,0] + 0.5 f[1,1]) / 2.5 = (1 + 2 + 1.5) / 2.5, (5 + 6 + 3.5) / 2.5
    assert torch.allclose(fg, torch.tensor([1.0, 5.0]), atol=1e-4)
    assert torch.allclose(bg, torch.tensor([4.5 / 2.5, 14.5 / 2.5]), atol=1e-4)


@pytest.mark.parametrize("shots", [1, 5])
def test_output_shape(shots: int, disk_task) -> None:
    task = disk_task(0, shots, 3)
    baseline = build_baseline("prototype", resolution=32)
    logits = baseline.predict(task.support_x, task.support_y, task.query_x)
    assert logits.shape == (3, 1, 32, 32)
    assert not logits.requires_grad
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= 2 * 20.0 + 1e-4  # |s_fg - s_bg| <= 2 * temperature


def test_prediction_is_invariant_to_support_order(disk_task) -> None:
    task = disk_task(1, 5, 3)
    baseline = build_baseline("prototype", resolution=32)
    perm = torch.tensor([3, 0, 4, 2, 1])
    a = baseline.predict(task.support_x, task.support_y, task.query_x)
    b = baseline.predict(task.support_x[perm], task.support_y[perm], task.query_x)
    assert torch.allclose(a, b, atol=1e-4)


def test_empty_support_mask_gives_finite_logits_and_gradients(disk_task) -> None:
    task = disk_task(2, 3, 2)
    empty = type(task)(task.support_x, torch.zeros_like(task.support_y), task.query_x, task.query_y)
    baseline = build_baseline("prototype", resolution=32)
    assert torch.isfinite(baseline.predict(empty.support_x, empty.support_y, empty.query_x)).all()
    loss = baseline.train_step([empty])
    assert math.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in baseline.state_dict().values())


def test_training_on_disks_beats_untrained_model(train_and_score) -> None:
    r = train_and_score("prototype", steps=40)
    assert r["train_last"] < 0.5 * r["train_first"]
    assert r["loss_after"] < 0.5 * r["loss_before"]
    assert r["dice_after"] > r["dice_before"] + 0.3
    assert r["dice_after"] > 0.7


def test_state_dict_round_trip_reproduces_predictions(disk_task) -> None:
    baseline = build_baseline("prototype", resolution=32, seed=0)
    baseline.train_step([disk_task(3, 3, 2), disk_task(4, 3, 2)])
    state = baseline.state_dict()
    task = disk_task(5, 3, 2)
    expected = baseline.predict(task.support_x, task.support_y, task.query_x)
    baseline.train_step([disk_task(6, 3, 2)])  # the saved state is a copy, not a view
    other = build_baseline("prototype", resolution=32, seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.predict(task.support_x, task.support_y, task.query_x), expected)
