"""The shared interface: factory, Protocol conformance, seeding."""

from __future__ import annotations

import pytest
import torch

from imaml_seg.baselines import BASELINES, FewShotBaseline, build_baseline


@pytest.mark.parametrize("name", BASELINES)
def test_factory_builds_protocol_conformant_baseline(name: str) -> None:
    baseline = build_baseline(name, resolution=32)
    assert isinstance(baseline, FewShotBaseline)
    assert baseline.name == name
    state = baseline.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("name", BASELINES)
def test_seed_fixes_initialisation_and_leaves_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_baseline(name, resolution=32, seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched by the factory
    b = build_baseline(name, resolution=32, seed=7).state_dict()
    c = build_baseline(name, resolution=32, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_name_and_bad_resolution_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("panet++", resolution=32)
    with pytest.raises(ValueError, match="resolution"):
        build_baseline("prototype", resolution=30)
    with pytest.raises(ValueError, match="resolution"):
        build_baseline("incontext", resolution=36)


@pytest.mark.parametrize("name", BASELINES)
def test_mismatched_episode_shapes_are_rejected(name: str) -> None:
    baseline = build_baseline(name, resolution=32)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="support_y"):
        baseline.predict(x, torch.zeros(3, 1, 32, 32), x)
    with pytest.raises(ValueError, match="query_x"):
        baseline.predict(x, torch.zeros(2, 1, 32, 32), torch.rand(2, 3, 16, 16))
