import math

import pytest
import torch

from imaml_seg.metrics import all_metrics, dice, hd95, iou, precision, recall


def mask(rows: list[str]) -> torch.Tensor:
    """A (1, 1, H, W) mask from strings of '.' and '#'."""
    return torch.tensor([[c == "#" for c in r] for r in rows], dtype=torch.float32)[None, None]


PRED = mask(["##..", "##..", "....", "...."])  # 4 pixels
TRUE = mask(["#...", "##..", "#...", "...."])  # 4 pixels, 3 shared


def test_hand_worked_overlap_scores() -> None:
    assert dice(PRED, TRUE).item() == pytest.approx(2 * 3 / 8)
    assert iou(PRED, TRUE).item() == pytest.approx(3 / 5)
    assert precision(PRED, TRUE).item() == pytest.approx(3 / 4)
    assert recall(PRED, TRUE).item() == pytest.approx(3 / 4)


def test_empty_mask_policy() -> None:
    empty = torch.zeros(1, 1, 4, 4)
    for fn in (dice, iou, precision, recall):
        assert fn(empty, empty).item() == 1.0
        assert fn(PRED, empty).item() == 0.0
        assert fn(empty, TRUE).item() == 0.0
    assert hd95(empty, empty).item() == 0.0
    assert hd95(PRED, empty).item() == pytest.approx(math.hypot(4, 4))


def test_hd95_of_shifted_square() -> None:
    a = torch.zeros(1, 1, 16, 16)
    b = torch.zeros(1, 1, 16, 16)
    a[..., 4:8, 4:8] = 1
    b[..., 4:8, 6:10] = 1  # shifted by 2 pixels
    assert hd95(a, b).item() == pytest.approx(2.0, abs=1e-6)
    assert hd95(a, a).item() == 0.0


def test_batch_shapes_and_threshold() -> None:
    pred = torch.cat([PRED * 0.9, TRUE * 0.4])  # second image is below threshold: empty
    target = torch.cat([TRUE, TRUE])
    scores = all_metrics(pred, target)
    assert set(scores) == {"dice", "iou", "precision", "recall", "hd95"}
    assert all(v.shape == (2,) for v in scores.values())
    assert scores["dice"][1].item() == 0.0


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="differ"):
        dice(PRED, torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        dice(PRED[0], TRUE[0])
