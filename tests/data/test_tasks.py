"""Pool split and task sampling: keyed determinism, disjoint sets, no test image ever sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imaml_seg.data import tasks
from imaml_seg.data.cache import SegArrays
from imaml_seg.data.tasks import TaskSampler, draw_support, pooled_batch, split_pools
from imaml_seg.data.validate import DataError

SPLIT = {"test_fraction": 0.5, "split_seed": 3}


def labelled(n: int, name: str = "toy", r: int = 8, offset: int = 0) -> SegArrays:
    """Image i is constant ``offset + i`` (so it can be recognised after flips); its mask has an
    asymmetric L shape in channel 0 also drawn into image channel 1 (to check joint transforms)."""
    images = np.zeros((n, 3, r, r), np.float32)
    masks = np.zeros((n, 1, r, r), np.float32)
    for i in range(n):
        images[i, 0] = offset + i
        masks[i, 0, :2, :] = 1
        masks[i, 0, :, :1] = 1
        images[i, 1] = masks[i, 0]
    return SegArrays(images, masks, tuple(f"{name}{i}" for i in range(n)), name)


def ids(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_split_disjoint_covering(n: int, fraction: float, seed: int) -> None:
    adapt, test = split_pools(n, fraction, seed)
    assert len(adapt) >= 1 and len(test) >= 1
    assert not set(adapt) & set(test)
    assert sorted([*adapt, *test]) == list(range(n))
    np.testing.assert_array_equal(split_pools(n, fraction, seed)[1], test)


def test_split_errors() -> None:
    with pytest.raises(DataError, match="at least 2 images"):
        split_pools(1, 0.5, 0)
    with pytest.raises(DataError, match="test_fraction"):
        split_pools(10, 1.0, 0)


def make_sampler(datasets: list[SegArrays], **kw) -> TaskSampler:
    args = {"shots": 3, "query_size": 2, "seed": 7, "augment": True, **SPLIT, **kw}
    return TaskSampler(datasets, **args)


def test_sample_is_keyed_by_seed_step_index() -> None:
    sampler = make_sampler([labelled(20), labelled(30, "b", offset=100)])
    a = sampler.sample(5, 2)
    b = make_sampler([labelled(20), labelled(30, "b", offset=100)]).sample(5, 2)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.dataset == b.dataset
    sampler.sample(9, 0)  # drawing other tasks in between changes nothing
    assert torch.equal(sampler.sample(5, 2).support_x, a.support_x)
    batch = sampler.sample_batch(5, 4)
    assert torch.equal(batch[2].query_y, a.query_y)
    assert len({tuple(ids(sampler.sample(s, 0).support_x)) for s in range(10)}) > 5


def test_task_shapes_and_types() -> None:
    task = make_sampler([labelled(20)]).sample(0, 0)
    assert task.support_x.shape == (3, 3, 8, 8) and task.query_x.shape == (2, 3, 8, 8)
    assert task.support_y.shape == (3, 1, 8, 8) and task.query_y.shape == (2, 1, 8, 8)
    assert task.support_x.dtype == torch.float32 and task.query_y.dtype == torch.float32
    assert task.dataset == "toy"


def test_support_query_disjoint_and_from_adaptation_pool() -> None:
    datasets = [labelled(20), labelled(12, "b", offset=100)]
    adapt = {d.name: set(split_pools(len(d), **{"test_fraction": 0.5, "seed": 3})[0])
             for d in datasets}
    sampler = make_sampler(datasets)
    seen = set()
    for step in range(40):
        for task in sampler.sample_batch(step, 3):
            support, query = ids(task.support_x), ids(task.query_x)
            assert not set(support) & set(query)
            assert len(set(support + query)) == 5
            offset = 100 if task.dataset == "b" else 0
            assert {i - offset for i in support + query} <= adapt[task.dataset]
            seen.add(task.dataset)
    assert seen == {"toy", "b"}


def test_test_pool_sampler() -> None:
    data = labelled(20)
    test = set(split_pools(20, 0.5, 3)[1])
    sampler = make_sampler([data], pool="test", augment=False)
    for step in range(20):
        task = sampler.sample(step, 0)
        assert set(ids(task.support_x) + ids(task.query_x)) <= test


def test_augmentation_moves_image_and_mask_together() -> None:
    sampler = make_sampler([labelled(20)])
    flipped = 0
    for step in range(10):
        task = sampler.sample(step, 0)
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            assert torch.equal(x[:, 1], y[:, 0])
            flipped += int((y[:, 0] != torch.from_numpy(labelled(1).masks[0, 0])).any(-1).any(-1)
                           .sum())
    assert flipped > 0
    plain = make_sampler([labelled(20)], augment=False).sample(0, 0)
    assert torch.equal(plain.support_y[0, 0], torch.from_numpy(labelled(1).masks[0, 0]))


def test_too_few_images() -> None:
    with pytest.raises(DataError, match=r"^small: asked for 3\+2 images per task but its "
                                        r"adaptation pool holds only 3$"):
        make_sampler([labelled(20), labelled(6, "small")])


def test_draw_support() -> None:
    data = labelled(30)
    adapt = set(split_pools(30, 0.5, 3)[0])
    x, y = draw_support(data, 5, 2, seed=1, **SPLIT)
    x2, _ = draw_support(data, 5, 2, seed=1, **SPLIT)
    assert x.shape == (5, 3, 8, 8) and y.shape == (5, 1, 8, 8)
    assert torch.equal(x, x2)
    assert set(ids(x)) <= adapt and len(set(ids(x))) == 5
    assert ids(x) != ids(draw_support(data, 5, 3, seed=1, **SPLIT)[0])
    with pytest.raises(DataError, match="asked for 16 shots but toy's adaptation pool holds only "
                                        "15 images"):
        draw_support(data, 16, 0, seed=1, **SPLIT)


def test_test_pool() -> None:
    data = labelled(30)
    test = sorted(split_pools(30, 0.5, 3)[1])
    x, y = tasks.test_pool(data, **SPLIT)
    assert ids(x) == test and y.shape == (15, 1, 8, 8)
    sub, _ = tasks.test_pool(data, size=4, seed=2, **SPLIT)
    assert len(ids(sub)) == 4 and set(ids(sub)) <= set(test)
    assert ids(sub) == ids(tasks.test_pool(data, size=4, seed=2, **SPLIT)[0])
    assert ids(tasks.test_pool(data, size=100, **SPLIT)[0]) == test


def test_pooled_batch() -> None:
    datasets = [labelled(20), labelled(12, "b", offset=100)]
    adapt = set(split_pools(20, 0.5, 3)[0]) | {100 + i for i in split_pools(12, 0.5, 3)[0]}
    x, y = pooled_batch(datasets, 16, 4, seed=0, augment=True, **SPLIT)
    x2, _ = pooled_batch(datasets, 16, 4, seed=0, augment=True, **SPLIT)
    assert x.shape == (16, 3, 8, 8) and y.shape == (16, 1, 8, 8) and torch.equal(x, x2)
    assert set(ids(x)) <= adapt
    assert torch.equal(x[:, 1], y[:, 0])
    assert not torch.equal(x, pooled_batch(datasets, 16, 5, seed=0, augment=True, **SPLIT)[0])
    big, _ = pooled_batch([labelled(4)], 10, 0, seed=0, augment=False, **SPLIT)
    assert set(ids(big)) <= set(split_pools(4, 0.5, 3)[0])


def test_dihedral_matches_the_array_transform_and_undoes() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = set()
    for code in tasks.DIHEDRAL:
        moved = tasks.dihedral(x, code)
        expected, _ = tasks._dihedral(x[0].numpy(), x[0, :1].numpy(), code)
        assert torch.equal(moved[0], torch.from_numpy(expected.copy()))
        assert torch.equal(tasks.undo_dihedral(moved, code), x)
        seen.add(tuple(moved[0, 0].flatten().tolist()))
    assert len(seen) == 8  # all 8 transforms of an asymmetric image differ
