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
    candidates_up_to,
    choose_steps,
    paired_wilcoxon,
    paired_wilcoxon_images,
    predict_logits,
    support_cv_steps,
)
from imaml_seg.meta.inner import adapt
from imaml_seg.metrics import dice
from imaml_seg.model import build_model, forward, get_params


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


def _sign_net(w: float, b: float) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A pixelwise predictor ``logit = w * channel0 + b`` (a 1x1 convolution), float64."""
    net = torch.nn.Conv2d(3, 1, 1).double()
    theta = {
        "weight": torch.tensor([w, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1),
        "bias": torch.tensor([b], dtype=torch.float64),
    }
    return net, theta


def _signed_pairs(*positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with random channel 0; pair i's mask is ``channel0 > 0`` if positive[i], else
    ``channel0 < 0``."""
    x = torch.randn(len(positive), 3, 8, 8, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    y = torch.stack([(x[i, :1] > 0) if p else (x[i, :1] < 0) for i, p in enumerate(positive)])
    return x, y.double()


def test_candidates_up_to_halve_the_steps_down_from_the_most() -> None:
    assert candidates_up_to(30) == (0, 3, 7, 15, 30)
    assert candidates_up_to(100) == (0, 12, 25, 50, 100)
    assert candidates_up_to(1) == (0, 1)
    assert candidates_up_to(0) == (0,)


def test_support_cv_skips_fine_tuning_that_hurts_held_out_pairs() -> None:
    # theta segments "channel 0 > 0", right for pair 0 and wrong for pair 1.  Fold 0 adapts on
    # pair 1 (whose mask is "channel 0 < 0"): w turns negative and held-out pair 0 drops from
    # Dice 1 to 0.  Fold 1 adapts on pair 0 and pair 1 stays near 0 (a bias that turned
    # positive claims a few pixels just below 0).  Means: 0 steps (1 + 0) / 2 = 0.5 exactly,
    # 30 steps near 0.
    net, theta = _sign_net(1.0, 0.0)
    x, y = _signed_pairs(True, False)
    inner = InnerConfig(inner_lr=1.0)
    best, means = support_cv_steps(net, theta, x, y, inner, (0, 30))
    assert best == 0
    assert means[0] == 0.5 and means[30] < 0.1


def test_support_cv_takes_the_steps_that_help_and_the_fewest_among_ties() -> None:
    # theta predicts background everywhere (Dice 0 on every pair); every pair is "channel 0 > 0",
    # which the 1x1 predictor learns from the others.
    net, theta = _sign_net(0.0, -5.0)
    x, y = _signed_pairs(True, True, True)
    inner = InnerConfig(inner_lr=1.0)
    best, means = support_cv_steps(net, theta, x, y, inner, (0, 30, 60))
    assert means[0] == 0.0 and means[30] > 0.95
    if means[60] == means[30]:
        assert best == 30
    else:
        assert best == max((30, 60), key=means.get)
    # Each candidate's mean is that of adapt() run directly on the other pairs of each fold.
    for c in (0, 30, 60):
        direct = []
        for held in range(3):
            rest = [i for i in range(3) if i != held]
            phi = adapt(net, theta, x[rest], y[rest], inner, steps=c).params
            direct.append(float(dice((forward(net, phi, x[held:held + 1]) > 0).double(),
                                     y[held:held + 1])[0]))
        assert means[c] == pytest.approx(sum(direct) / 3, abs=1e-12)


def test_choose_steps_best_or_fewest_within_one_standard_error() -> None:
    # Held-out Dice of three pairs per candidate: means 0.7, 0.7667 and 0.8.  The best mean is
    # 30 steps; its scores have std 0.1 (Bessel), so one standard error is 0.1 / sqrt(3) =
    # 0.0577 and the bar is 0.8 - 0.0577 = 0.7423: 15 steps clears it, 0 steps does not.
    held_out = {
        0: torch.tensor([0.5, 0.9, 0.7]),
        15: torch.tensor([0.8, 0.8, 0.7]),
        30: torch.tensor([0.9, 0.7, 0.8]),
    }
    assert choose_steps(held_out) == 30
    assert choose_steps(held_out, "one_se") == 15
    # 0 steps at 0.75 clears the bar too: the fewest steps win.
    assert choose_steps({**held_out, 0: torch.tensor([0.6, 0.9, 0.75])}, "one_se") == 0
    # Equal scores everywhere: the standard error is 0 and both rules take the fewest steps.
    flat = {c: torch.tensor([0.5, 0.5]) for c in (0, 7, 30)}
    assert choose_steps(flat) == choose_steps(flat, "one_se") == 0
    with pytest.raises(ValueError, match="unknown support CV rule"):
        choose_steps(held_out, "median")


def test_choose_steps_paired_rule_counts_a_deficit_seen_on_every_pair() -> None:
    # 30 steps beat 0 steps by exactly 0.1 on each of three pairs that differ widely in Dice.
    # one_se: the best's scores (0.6, 1.0, 0.8) have std 0.2, SE 0.2 / sqrt(3) = 0.115, so
    # 0 steps (mean 0.7 >= 0.8 - 0.115) is kept; paired_se: the deficits (0.1, 0.1, 0.1) have
    # SE 0 and mean 0.1 > 0, so 0 steps is out and 30 steps stay.
    steady = {0: torch.tensor([0.5, 0.9, 0.7]), 30: torch.tensor([0.6, 1.0, 0.8])}
    assert choose_steps(steady, "one_se") == 0
    assert choose_steps(steady, "paired_se") == 30
    # Deficits (-0.3, 0.5, 0.1): mean 0.1, std 0.4, SE 0.231 >= 0.1, so 0 steps is kept.
    noisy = {0: torch.tensor([0.9, 0.5, 0.7]), 30: torch.tensor([0.6, 1.0, 0.8])}
    assert choose_steps(noisy, "paired_se") == 0
    assert choose_steps(noisy) == 30
    # One held-out pair: no standard error, so the rule is the best mean's.
    single = {0: torch.tensor([0.7]), 15: torch.tensor([0.71]), 30: torch.tensor([0.6])}
    assert choose_steps(single, "paired_se") == choose_steps(single) == 15


def test_support_cv_steps_applies_the_rule() -> None:
    # The sign net of the test above: fine-tuning for 30 steps scores near 0 on held-out pairs,
    # 0 steps 0.5 -- both rules keep theta.  With theta predicting background everywhere and
    # every pair learnable, both take the steps (held-out Dice near 1, one SE far above 0).
    net, theta = _sign_net(1.0, 0.0)
    x, y = _signed_pairs(True, False)
    inner = InnerConfig(inner_lr=1.0)
    assert support_cv_steps(net, theta, x, y, inner, (0, 30), rule="one_se")[0] == 0
    net, theta = _sign_net(0.0, -5.0)
    x, y = _signed_pairs(True, True, True)
    assert support_cv_steps(net, theta, x, y, inner, (0, 30), rule="one_se")[0] == 30


def test_support_cv_needs_two_pairs() -> None:
    net, theta = _sign_net(1.0, 0.0)
    x, y = _signed_pairs(True)
    with pytest.raises(ValueError, match="at least 2"):
        support_cv_steps(net, theta, x, y, InnerConfig(), (0, 5))


def test_adapted_model_with_support_cv_records_the_steps_it_chose() -> None:
    net, theta = _sign_net(1.0, 0.0)
    config = RunConfig(eval=EvalConfig(inner_steps=30, inner_lr=1.0, support_cv=True))
    wrapper = AdaptedModel.from_config("m", net, theta, config, torch.device("cpu"))
    assert wrapper.support_cv and wrapper.choice == {}
    assert wrapper.support_cv_rule == "best"
    one_se = RunConfig(eval=EvalConfig(support_cv=True, support_cv_rule="one_se"))
    assert AdaptedModel.from_config("m", net, theta, one_se, torch.device("cpu")).support_cv_rule \
        == "one_se"
    x, y = _signed_pairs(True, False)
    phi = wrapper.adapt(x, y)
    assert wrapper.choice["inner_steps"] == 0
    # ... with every candidate's mean held-out Dice, the chosen one the best.
    cv = wrapper.choice["cv_dice"]
    assert set(cv) == {"0", "3", "7", "15", "30"} and cv["0"] == max(cv.values())
    assert all(torch.equal(phi[k], theta[k]) for k in theta)
    # One shot cannot be split: it adapts the most steps.
    one = wrapper.adapt(x[:1], y[:1])
    assert wrapper.choice == {"inner_steps": 30}
    direct = adapt(net, theta, x[:1], y[:1], wrapper.inner, steps=30).params
    assert all(torch.equal(one[k], direct[k]) for k in theta)


def test_paired_wilcoxon_needs_a_method_that_varies_over_the_draws() -> None:
    def records(method: str, scores: list[float]) -> list[dict]:
        return [{"method": method, "shots": 5, "draw": d, "dice": v} for d, v in enumerate(scores)]

    fine_tuned = records("a", [0.61, 0.52, 0.70, 0.58, 0.66, 0.49])
    zero_shot = records("b", [0.55] * 6)  # no support set used: every draw scores the same
    # One side varies: a valid test of the draws against a constant (here 6 of 6 would need
    # all one sign; 4 above, 2 below).
    p = paired_wilcoxon(fine_tuned + zero_shot, "a", "b", 5)
    assert p is not None and 0 < p < 1
    # Neither varies: 6 draws repeat one comparison, so no p-value rather than p = 0.03.
    assert paired_wilcoxon(zero_shot + records("c", [0.50] * 6), "b", "c", 5) is None
    assert paired_wilcoxon(fine_tuned, "a", "a", 5) is None  # no difference


def test_paired_wilcoxon_images_pairs_each_image_averaged_over_the_shared_draws() -> None:
    def record(method: str, draw: int, per_image: list[float]) -> dict:
        return {"method": method, "shots": 5, "draw": draw, "dice_per_image": per_image}

    a = [
        record("a", 0, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        record("a", 1, [0.7, 0.8, 0.9, 1.0, 1.0, 1.0]),  # mean: .6 .7 .8 .9 .95 1
        record("a", 2, [0.0] * 6),  # b has no draw 2: left out, or every sign would flip
    ]
    b = [record("b", d, [0.55, 0.62, 0.70, 0.78, 0.81, 0.84]) for d in (0, 1)]
    # Six differences (.05 .08 .10 .12 .14 .16), all positive: exact p = 2 / 2**6.
    assert paired_wilcoxon_images(a + b, "a", "b", 5) == pytest.approx(2 / 64)
    assert paired_wilcoxon_images(b, "b", "b", 5) is None  # no difference
    assert paired_wilcoxon_images(a + b, "a", "b", 10) is None  # no 10-shot draws


def test_support_cv_scores_and_returns_other_weights_where_it_takes_no_step() -> None:
    # theta predicts background everywhere (held-out Dice 0 at 0 steps) and fine-tuning learns
    # "channel 0 > 0" (near 1 after 30 steps); the unadapted weights (a blend) segment it
    # already (Dice 1 on every pair), so the 0-step candidate is theirs and wins.
    net, theta = _sign_net(0.0, -5.0)
    _, blend = _sign_net(1.0, 0.0)
    x, y = _signed_pairs(True, True, True)
    inner = InnerConfig(inner_lr=1.0)
    assert support_cv_steps(net, theta, x, y, inner, (0, 30))[0] == 30
    best, means = support_cv_steps(net, theta, x, y, inner, (0, 30), unadapted=blend)
    assert best == 0 and means[0] == 1.0
    config = RunConfig(eval=EvalConfig(inner_steps=30, inner_lr=1.0, support_cv=True))
    wrapper = AdaptedModel.from_config("m", net, theta, config, torch.device("cpu"), blend)
    assert wrapper.adapt(x, y) is blend and wrapper.choice["inner_steps"] == 0
    # Where steps are taken, they start from theta, not from the unadapted weights.
    one = wrapper.adapt(x[:1], y[:1])
    direct = adapt(net, theta, x[:1], y[:1], wrapper.inner, steps=30).params
    assert all(torch.equal(one[k], direct[k]) for k in theta)
    none = AdaptedModel.from_config("m", net, theta, RunConfig(eval=EvalConfig(inner_steps=0)),
                                    torch.device("cpu"), blend)
    assert none.adapt(x, y) is blend
