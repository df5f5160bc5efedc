"""Evaluation helpers: test-time augmentation, the adapted-model wrapper, statistics."""

from __future__ import annotations

import pytest
import torch

from imaml_seg.config import EvalConfig, InnerConfig, ModelConfig, RunConfig, eval_inner
from imaml_seg.evaluation import (
    AdaptedModel,
    TestTimeAugmented,
    averaged_over_dihedral,
    bootstrap_ci,
    predict_logits,
)
from imaml_seg.model import build_model, get_params


def test_tta_of_a_pixelwise_predictor_is_the_predictor() -> None:
    # Each pixel's logit is a function of that pixel alone: every flip/rotation, mapped back,
    # gives the same map, so the average is the map itself.
    images = torch.randn(3, 3, 8, 8)
    plain = images[:, :1] * 2.0
    averaged = averaged_over_dihedral(lambda x: x[:, :1] * 2.0, images)
    assert torch.allclose(averaged, plain.clamp(-13.8, 13.8), atol=1e-4)


def test_tta_averages_probabilities_of_the_eight_views() -> None:
    # A predictor that only sees the top-left pixel of whatever view it gets: the 4 corners
    # each become that pixel in 2 of the 8 views, so every output pixel is the mean probability
    # of the 4 corners (hand-worked: corners 0, 0, 0 and logit(0.8) -> p = 0.2).
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 3, 3] = torch.logit(torch.tensor(0.8))
    averaged = averaged_over_dihedral(lambda x: x[:, :, :1, :1].expand_as(x).clone(), image)
    p = torch.sigmoid(averaged)
    expected = (0.5 * 3 + 0.8) / 4
    assert torch.allclose(p, torch.full_like(p, expected), atol=1e-5)


def test_eval_settings_override_the_inner_loop_only_where_given() -> None:
    inner = InnerConfig(inner_steps=5, inner_lr=0.1, optimizer="sgd", lam=2.0)
    same = eval_inner(inner, EvalConfig(inner_steps=30))
    assert (same.optimizer, same.inner_lr, same.inner_steps, same.lam) == ("sgd", 0.1, 30, 2.0)
    other = eval_inner(inner, EvalConfig(inner_steps=7, optimizer="adam", inner_lr=1e-3))
    assert (other.optimizer, other.inner_lr, other.inner_steps) == ("adam", 1e-3, 7)


def test_adapted_model_from_config_applies_the_eval_section() -> None:
    config = RunConfig(
        model=ModelConfig(features=(4, 4, 8, 8, 16, 4)),
        eval=EvalConfig(inner_steps=2, optimizer="adam", inner_lr=1e-3, augment_support=True,
                        tta=True),
    )
    net = build_model(config.model)
    wrapper = AdaptedModel.from_config("m", net, get_params(net), config, torch.device("cpu"))
    assert (wrapper.steps, wrapper.inner.optimizer, wrapper.augment, wrapper.tta) == (
        2, "adam", True, True
    )
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    params = wrapper.adapt(x, y)
    expected = predict_logits(net, params, x, torch.device("cpu"), tta=True)
    assert torch.allclose(wrapper.predict(x, y, x), expected, atol=1e-5)
    assert not torch.allclose(expected, predict_logits(net, params, x, torch.device("cpu")))


def test_tta_wrapper_keeps_the_name_and_leaves_the_support_set_alone() -> None:
    class Mean:
        name = "mean"

        def predict(self, support_x, support_y, query_x):
            return query_x[:, :1] + support_y.mean()

    support_y = torch.ones(2, 1, 4, 4)
    query = torch.randn(3, 3, 4, 4)
    wrapped = TestTimeAugmented(Mean())
    assert wrapped.name == "mean"
    assert torch.allclose(wrapped.predict(torch.zeros(2, 3, 4, 4), support_y, query),
                          query[:, :1] + 1.0, atol=1e-4)


def test_bootstrap_ci_brackets_the_mean() -> None:
    lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lo < 0.3 < hi
    assert bootstrap_ci([0.4]) == (pytest.approx(0.4), pytest.approx(0.4))
