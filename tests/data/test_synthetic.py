"""The synthetic generator: deterministic, well-formed, and visibly different domains."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imaml_seg.data.synthetic import (
    DOMAINS,
    NUM_DOMAINS,
    parse_synthetic,
    render,
    synthetic_arrays,
)
from imaml_seg.data.validate import DataError


def test_domain_table() -> None:
    assert NUM_DOMAINS == len(DOMAINS) == 8
    assert len({(d.background, d.shape, d.contrast) for d in DOMAINS}) == NUM_DOMAINS


@pytest.mark.parametrize("domain", range(NUM_DOMAINS))
def test_shapes_binary_non_empty(domain: int) -> None:
    arrays = synthetic_arrays(domain, n=16, resolution=32)
    assert arrays.name == f"synthetic:{domain}" and len(arrays.names) == 16
    assert arrays.images.shape == (16, 3, 32, 32) and arrays.images.dtype == np.float32
    assert arrays.masks.shape == (16, 1, 32, 32) and arrays.masks.dtype == np.float32
    assert set(np.unique(arrays.masks)) <= {0.0, 1.0}
    assert arrays.masks.any(axis=(1, 2, 3)).all() and not arrays.masks.all(axis=(1, 2, 3)).any()
    np.testing.assert_allclose(arrays.images.mean(axis=(2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(arrays.images.std(axis=(2, 3)), 1, atol=1e-3)


def test_non_empty_at_tiny_resolution() -> None:
    for domain in range(NUM_DOMAINS):
        assert synthetic_arrays(domain, n=8, resolution=16).masks.any(axis=(1, 2, 3)).all()


def test_deterministic_and_seeded() -> None:
    a, b = synthetic_arrays(3, n=8, resolution=32), synthetic_arrays(3, n=8, resolution=32)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    c = synthetic_arrays(3, n=8, resolution=32, seed=1)
    assert not np.array_equal(a.images, c.images)


def test_more_images_keep_the_first_ones() -> None:
    small, large = synthetic_arrays(5, n=4, resolution=32), synthetic_arrays(5, n=9, resolution=32)
    np.testing.assert_array_equal(small.images, large.images[:4])


def test_domains_visibly_differ() -> None:
    """Mean colour (before normalisation) and lesion share separate every pair of domains."""
    stats = []
    for domain in range(NUM_DOMAINS):
        renders = [render(domain, i, 64) for i in range(24)]
        colour = np.mean([image.mean(axis=(1, 2)) for image, _ in renders], axis=0)
        stats.append(colour)
    for i in range(NUM_DOMAINS):
        for j in range(i + 1, NUM_DOMAINS):
            assert np.abs(stats[i] - stats[j]).max() > 0.04, (i, j)


def test_lesion_contrast_direction() -> None:
    """'brighter' lesions are brighter than their surroundings, 'darker' ones darker."""
    for domain, spec in enumerate(DOMAINS):
        if spec.contrast == "texture":
            continue
        diffs = []
        for i in range(16):
            image, mask = render(domain, i, 64)
            grey = image.mean(axis=0)
            diffs.append(grey[mask].mean() - grey[~mask].mean())
        assert np.sign(np.mean(diffs)) == (1 if spec.contrast == "brighter" else -1), domain


def test_fast() -> None:
    start = time.perf_counter()
    synthetic_arrays(7, n=64, resolution=64)
    assert time.perf_counter() - start < 1.0


def test_parse() -> None:
    assert parse_synthetic("synthetic:3") == (3, 64)
    assert parse_synthetic("synthetic:0:10") == (0, 10)
    for bad in ("synthetic:8", "synthetic:x", "synthetic:", "synthetic:1:0", "synthetic:1:2:3"):
        with pytest.raises(DataError):
            parse_synthetic(bad)
