"""Figures are small palette PNGs that keep what they show."""

import numpy as np
from PIL import Image

from imaml_seg.plots import dice_vs_shots, learning_curves, overlay, overlay_grid


def test_overlay_marks_prediction_green_and_truth_outline_red():
    rgb = np.zeros((5, 5, 3))
    pred = np.zeros((5, 5), bool)
    pred[0, 0] = True
    truth = np.zeros((5, 5), bool)
    truth[1:4, 1:4] = True
    out = overlay(rgb, pred, truth)
    np.testing.assert_allclose(out[0, 0], 0.45 * np.array([0.1, 0.9, 0.2]))
    np.testing.assert_allclose(out[1, 1], [1.0, 0.1, 0.1])  # outline
    np.testing.assert_allclose(out[2, 2], 0.0)  # inside the truth, not on its edge
    np.testing.assert_allclose(out[4, 4], 0.0)


def test_figures_are_palette_pngs(tmp_path):
    curves = {"imaml": {1: (0.4, 0.3, 0.5), 5: (0.6, 0.5, 0.7)}}
    png = dice_vs_shots(curves, tmp_path / "d.png", "unseen target")
    with Image.open(png) as image:
        assert image.mode == "P"
        assert image.size == (605, 418)  # 5.5 x 3.8 inches at 110 dpi
        colours = image.convert("RGB").getcolors(256)
    assert colours is not None and len(colours) > 4  # lines, fill, text survive quantising


def test_overlay_grid_keeps_the_colours_of_masks(tmp_path):
    image = np.zeros((3, 16, 16), np.float32)
    image[:, :, 8:] = 1.0
    pred = np.zeros((16, 16), bool)
    pred[4:12, 4:12] = True
    png = overlay_grid([("imaml", [image], [pred], [pred])], tmp_path / "g.png")
    with Image.open(png) as grid:
        rgb = np.asarray(grid.convert("RGB")).reshape(-1, 3).astype(int)
    red = (rgb[:, 0] > 200) & (rgb[:, 1] < 80) & (rgb[:, 2] < 80)
    green = (rgb[:, 1] > rgb[:, 0] + 40) & (rgb[:, 1] > rgb[:, 2] + 40)
    assert red.any() and green.any()


def test_learning_curves_draw_the_starts_query_loss_when_logged(tmp_path):
    """The start's query loss (``meta.start_weight`` runs) is a grey line; plain logs have none."""

    def grey_pixels(records):
        png = learning_curves({"imaml_warm": records}, tmp_path / "c.png")
        with Image.open(png) as image:
            rgb = np.asarray(image.convert("RGB")).astype(int)
        return int((np.abs(rgb - 127).max(axis=-1) <= 12).sum())

    plain = [{"step": s, "query_loss": 1.0 / s} for s in range(1, 40)]
    with_start = [dict(r, start_query_loss=0.5 + 0.01 * r["step"]) for r in plain]
    assert learning_curves({}, tmp_path / "none.png") is None
    assert grey_pixels(with_start) > grey_pixels(plain) + 100
