"""UniverSeg-style in-context baseline: shapes, the cross-conv split, invariances, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imaml_seg.baselines import build_baseline
from imaml_seg.baselines.incontext import CrossBlock


def test_split_cross_conv_equals_conv_on_concatenation() -> None:
    torch.manual_seed(0)
    block = CrossBlock(3, 5, 4)
    q, s = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 5, 8, 8)
    weight = torch.cat([block.cross_q.weight, block.cross_s.weight], dim=1)  # (4, 3 + 5, 3, 3)
    direct = F.conv2d(torch.cat([q, s[:, 0]], dim=1), weight, padding=1)
    split = block.cross_q(q) + block.cross_s(s[:, 0])
    assert torch.allclose(direct, split, atol=1e-5)


def test_cross_block_shares_or_pairs_support() -> None:
    block = CrossBlock(3, 4, 6)
    q = torch.randn(2, 3, 8, 8)
    shared, paired = torch.randn(1, 5, 4, 8, 8), torch.randn(2, 5, 4, 8, 8)
    for s in (shared, paired):
        q_new, s_new = block(q, s)
        assert q_new.shape == (2, 6, 8, 8) and s_new is not None and s_new.shape == (2, 5, 6, 8, 8)
    with pytest.raises(ValueError, match="support batch"):
        block(q, torch.randn(3, 5, 4, 8, 8))


@pytest.mark.parametrize("shots", [1, 5])
def test_output_shape(shots: int, disk_task) -> None:
    task = disk_task(0, shots, 3)
    baseline = build_baseline("incontext", resolution=32)
    logits = baseline.predict(task.support_x, task.support_y, task.query_x)
    assert logits.shape == (3, 1, 32, 32)
    assert not logits.requires_grad
    assert torch.isfinite(logits).all()


def test_prediction_is_invariant_to_support_order_and_reads_the_support(disk_task) -> None:
    task = disk_task(1, 5, 3)
    baseline = build_baseline("incontext", resolution=32)
    perm = torch.tensor([3, 0, 4, 2, 1])
    a = baseline.predict(task.support_x, task.support_y, task.query_x)
    b = baseline.predict(task.support_x[perm], task.support_y[perm], task.query_x)
    assert torch.allclose(a, b, atol=1e-4)
    c = baseline.predict(task.support_x, 1.0 - task.support_y, task.query_x)
    assert not torch.allclose(a, c, atol=1e-3)  # the masks are an input, not ignored


def test_each_query_is_predicted_independently(disk_task) -> None:
    task = disk_task(2, 3, 4)
    baseline = build_baseline("incontext", resolution=32)
    together = baseline.predict(task.support_x, task.support_y, task.query_x)
    alone = baseline.predict(task.support_x, task.support_y, task.query_x[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-4)


def test_empty_support_mask_gives_finite_logits_and_gradients(disk_task) -> None:
    task = disk_task(2, 3, 2)
    empty = type(task)(task.support_x, torch.zeros_like(task.support_y), task.query_x, task.query_y)
    baseline = build_baseline("incontext", resolution=32)
    assert torch.isfinite(baseline.predict(empty.support_x, empty.support_y, empty.query_x)).all()
    assert math.isfinite(baseline.train_step([empty]))
    assert all(torch.isfinite(v).all() for v in baseline.state_dict().values())


def test_training_on_disks_beats_untrained_model(train_and_score) -> None:
    r = train_and_score("incontext", steps=40)
    assert r["train_last"] < 0.85 * r["train_first"]
    assert r["loss_after"] < 0.85 * r["loss_before"]
    assert r["dice_after"] > r["dice_before"] + 0.3
    assert r["dice_after"] > 0.6


def test_state_dict_round_trip_reproduces_predictions(disk_task) -> None:
    baseline = build_baseline("incontext", resolution=32, seed=0)
    baseline.train_step([disk_task(3, 3, 2), disk_task(4, 3, 2)])
    state = baseline.state_dict()
    task = disk_task(5, 3, 2)
    expected = baseline.predict(task.support_x, task.support_y, task.query_x)
    baseline.train_step([disk_task(6, 3, 2)])  # the saved state is a copy, not a view
    other = build_baseline("incontext", resolution=32, seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.predict(task.support_x, task.support_y, task.query_x), expected)
