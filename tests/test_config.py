"""Run configuration: validation of values, and the split of the training and evaluation seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imaml_seg.config import ConfigError, load, merge
from imaml_seg.meta.trainer import init_theta

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"meta": {"max_grad_norm": 0.0}}, "meta.max_grad_norm must be > 0"),
        ({"inner": {"lam": 0.0}}, "inner.lam must be > 0"),
        ({"inner": {"inner_lr": 0.5, "lam": 4.0}}, "proximal SGD diverges"),
        ({"meta": {"algorithm": "mamll"}}, "meta.algorithm must be one of"),
        ({"data": {"resolution": 40}}, "multiple of 16"),
        ({"eval": {"support_cv_rule": "1se"}}, "eval.support_cv_rule must be one of"),
        ({"eval": {"start_blend": 1.5}}, r"eval.start_blend must be in \[0, 1\]"),
    ],
)
def test_values_that_cannot_work_are_refused_with_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        merge(load(TINY), overrides)


def test_unknown_key_names_where_it_is() -> None:
    with pytest.raises(ConfigError, match=r"config\.meta: unknown key 'max_grad_nrom'"):
        merge(load(TINY), {"meta": {"max_grad_nrom": 1.0}})


def test_training_seed_is_seed_unless_train_seed_is_set() -> None:
    config = merge(load(TINY), {"seed": 3})
    assert config.train_seed is None and config.training_seed == 3
    assert merge(config, {"train_seed": 7}).training_seed == 7


def test_train_seed_alone_sets_the_initialisation() -> None:
    cpu = torch.device("cpu")
    base = init_theta(load(TINY), cpu)
    other_eval_seed = init_theta(merge(load(TINY), {"seed": 5, "train_seed": 0}), cpu)
    other_train_seed = init_theta(merge(load(TINY), {"train_seed": 1}), cpu)
    assert all(torch.equal(base[k], other_eval_seed[k]) for k in base)
    assert any(not torch.equal(base[k], other_train_seed[k]) for k in base)
