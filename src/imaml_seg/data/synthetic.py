"""The embedded multi-domain generator: segmentation tasks that need no download.

Eight domains, each a family of images that share a background texture, a colour palette, a
lesion shape and a way the lesion stands out (brighter, darker, or only by texture), plus a noise
level.  Within a domain every image redraws colours, texture phase and frequency, lesion size,
position and orientation.  Domains share building blocks (domain 7, the default target, combines
the checker background of 3, the star shape of 1 and the brighter lesions of 0-2), so what is
learnt on some domains transfers to an unseen one, while 5 shots alone are too few to learn it.

Pure numpy and deterministic: image ``i`` of a domain depends only on ``(seed, domain, i)`` and
the resolution, so asking for more images keeps the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imaml_seg.data.cache import SegArrays, normalise
from imaml_seg.data.validate import DataError

NUM_DOMAINS = 8
DEFAULT_SIZE = 64
"""Images per domain when a spec does not say (``synthetic:<domain>:<n>`` does)."""

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Domain:
    """How one synthetic domain draws its images."""

    background: str
    """'gradient', 'stripes', 'blobs' (smoothed noise) or 'checker'."""
    shape: str
    """'ellipse', 'star' (blobby), 'polygon', 'spots' (several small blobs), 'band' (thin)."""
    contrast: str
    """'brighter', 'darker' or 'texture' (same mean colour, different texture)."""
    base: RGB
    """Background colour."""
    texture: RGB
    """Colour direction of the background texture."""
    lesion: RGB
    """Colour direction of the lesion's shift (brighter/darker) or texture."""
    noise: float
    """Standard deviation of the pixel noise (images in [0, 1])."""
    lesion_texture: str = "speckle"
    """For 'texture' contrast: 'speckle' (fine noise) or 'stripes' (fine stripes)."""
    vignette: float = 0.0
    """Darkening towards the corners (endoscope-like illumination)."""


DOMAINS: tuple[Domain, ...] = (
    Domain("gradient", "ellipse", "darker", (0.78, 0.60, 0.52), (1.0, 0.8, 0.7),
           (0.8, 1.0, 1.0), 0.03),  # dermoscopy-like: dark lesion on skin
    Domain("stripes", "star", "brighter", (0.35, 0.40, 0.55), (0.6, 0.7, 1.0),
           (1.0, 1.0, 0.6), 0.06, vignette=0.2),
    Domain("blobs", "spots", "brighter", (0.30, 0.50, 0.30), (0.5, 1.0, 0.5),
           (1.0, 0.9, 0.4), 0.05),
    Domain("checker", "band", "darker", (0.60, 0.45, 0.65), (1.0, 0.7, 1.0),
           (1.0, 1.0, 0.7), 0.04),  # vessel-like band
    Domain("gradient", "polygon", "texture", (0.55, 0.55, 0.55), (1.0, 1.0, 1.0),
           (1.0, 1.0, 1.0), 0.03, lesion_texture="stripes"),
    Domain("blobs", "ellipse", "darker", (0.85, 0.65, 0.45), (1.0, 0.7, 0.4),
           (0.7, 1.0, 1.0), 0.08),
    Domain("stripes", "spots", "texture", (0.30, 0.55, 0.60), (0.5, 1.0, 1.0),
           (0.6, 1.0, 1.0), 0.04, lesion_texture="speckle"),
    Domain("checker", "star", "brighter", (0.65, 0.30, 0.25), (1.0, 0.5, 0.4),
           (1.0, 0.8, 0.6), 0.06, vignette=0.25),  # endoscopy-like: bright polyp, red mucosa
)


def parse_synthetic(spec: str) -> tuple[int, int]:
    """``'synthetic:<domain>[:<n>]'`` -> ``(domain, n)``; DataError if malformed."""
    parts = spec.split(":")
    try:
        if parts[0] != "synthetic" or len(parts) not in (2, 3):
            raise ValueError
        domain = int(parts[1])
        n = int(parts[2]) if len(parts) == 3 else DEFAULT_SIZE
    except ValueError:
        raise DataError(f"'{spec}': expected synthetic:<domain> or synthetic:<domain>:<n> with "
                        f"domain in 0..{NUM_DOMAINS - 1}") from None
    _check(domain, n)
    return domain, n


def _check(domain: int, n: int) -> None:
    if not 0 <= domain < NUM_DOMAINS:
        raise DataError(f"synthetic:{domain}: domain must be in 0..{NUM_DOMAINS - 1}")
    if n < 1:
        raise DataError(f"synthetic:{domain}: needs at least 1 image, asked for {n}")


def _lowpass(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a square ``(R, R)`` field via the FFT (wraps around; fine for textures)."""
    freq = np.fft.fftfreq(field.shape[0])
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2
    kernel = np.exp(-2.0 * np.pi**2 * sigma_px**2 * f2)
    return np.fft.ifft2(np.fft.fft2(field) * kernel).real


def _smooth_noise(rng: np.random.Generator, r: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed over ``scale`` (in units of the half image width)."""
    field = _lowpass(rng.standard_normal((r, r)), max(scale * r / 2, 0.5))
    return (field - field.mean()) / (field.std() + 1e-8)


def _background(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A texture field, roughly in [-1, 1]."""
    r = x.shape[0]
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if kind == "gradient":
        return u * rng.uniform(0.6, 1.0) + 0.3 * _smooth_noise(rng, r, 0.5)
    if kind == "stripes":
        return np.sin(np.pi * rng.uniform(2.5, 5.0) * u + rng.uniform(0, 2 * np.pi))
    if kind == "blobs":
        return 0.6 * _smooth_noise(rng, r, rng.uniform(0.08, 0.16))
    if kind == "checker":
        f = rng.uniform(2.0, 4.0)
        phase = rng.uniform(0, 2 * np.pi, 2)
        return np.tanh(3 * np.sin(np.pi * f * u + phase[0]) * np.sin(np.pi * f * v + phase[1]))
    raise ValueError(f"unknown background {kind!r}")


def _shape(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A lesion mask ``bool (R, R)`` on the [-1, 1]^2 grid."""
    cx, cy = rng.uniform(-0.4, 0.4, 2)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "ellipse":
        a = rng.uniform(0.2, 0.45)
        b = a * rng.uniform(0.5, 1.0)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "star":
        phi = np.arctan2(v, u)
        radius = np.full_like(phi, rng.uniform(0.2, 0.38))
        lobes = int(rng.integers(3, 7))
        radius *= 1 + rng.uniform(0.15, 0.35) * np.cos(lobes * phi)
        for k in (2, 3):
            radius *= 1 + rng.uniform(0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v) <= radius
    if kind == "polygon":
        sides = int(rng.integers(3, 7))
        size = rng.uniform(0.22, 0.42)
        stretch = rng.uniform(0.6, 1.0)
        normals = 2 * np.pi * np.arange(sides) / sides + rng.uniform(-0.25, 0.25, sides)
        proj = np.stack([u * np.cos(t) + v / stretch * np.sin(t) for t in normals])
        return proj.max(axis=0) <= size
    if kind == "spots":
        mask = np.zeros(x.shape, bool)
        for _ in range(int(rng.integers(2, 6))):
            sx, sy = rng.uniform(-0.7, 0.7, 2)
            mask |= np.hypot(x - sx, y - sy) <= rng.uniform(0.06, 0.14)
        return mask
    if kind == "band":
        curve = rng.uniform(0.1, 0.3) * np.sin(rng.uniform(2, 5) * u + rng.uniform(0, 2 * np.pi))
        half_width = rng.uniform(0.03, 0.06)
        return (np.abs(v - curve) <= half_width) & (np.abs(u) <= rng.uniform(0.6, 0.95))
    raise ValueError(f"unknown shape {kind!r}")


def _lesion_texture(kind: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
    r = x.shape[0]
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        return np.sin(np.pi * rng.uniform(7.0, 10.0) * u + rng.uniform(0, 2 * np.pi))
    return np.tanh(1.5 * _smooth_noise(rng, r, 1.5 / r))  # speckle of ~1.5 px grains


def render(domain: int, index: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Image ``index`` of ``domain``: ``(3, R, R)`` float in [0, 1] and ``bool (R, R)`` mask."""
    spec = DOMAINS[domain]
    rng = np.random.default_rng([seed, domain, index])
    c = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")

    mask = _shape(spec.shape, rng, x, y)
    for _ in range(20):  # tiny resolutions can miss every pixel centre: redraw
        if mask.any():
            break
        mask = _shape(spec.shape, rng, x, y)
    else:
        mask[resolution // 2, resolution // 2] = True

    base = np.asarray(spec.base) + rng.uniform(-0.06, 0.06, 3)
    texture_dir = np.asarray(spec.texture)[:, None, None]
    lesion_dir = np.asarray(spec.lesion)[:, None, None]
    field = _background(spec.background, rng, x, y)
    image = base[:, None, None] + rng.uniform(0.08, 0.16) * field[None] * texture_dir

    alpha = np.clip(_lowpass(mask.astype(np.float64), 0.7), 0, 1)[None]  # soft edges
    if spec.contrast == "texture":
        pattern = _lesion_texture(spec.lesion_texture, rng, x, y)
        inside = base[:, None, None] + rng.uniform(0.16, 0.26) * pattern[None] * lesion_dir
        image = image * (1 - alpha) + inside * alpha
    else:
        sign = 1.0 if spec.contrast == "brighter" else -1.0
        shift = sign * rng.uniform(0.18, 0.32) + 0.04 * _smooth_noise(rng, resolution, 0.15)
        image = image + alpha * shift[None] * lesion_dir

    if spec.vignette:
        image = image * (1 - spec.vignette * rng.uniform(0.5, 1.0) * (x**2 + y**2) / 2)[None]
    sigma = spec.noise * rng.uniform(0.7, 1.3)
    grey_noise = rng.standard_normal((1, resolution, resolution))
    image = image + sigma * (0.7 * grey_noise + 0.3 * rng.standard_normal(image.shape))
    return np.clip(image, 0.0, 1.0), mask


def synthetic_arrays(
    domain: int, n: int = DEFAULT_SIZE, resolution: int = 64, seed: int = 0
) -> SegArrays:
    """``n`` images of one domain, normalised like real data; named ``synthetic:<domain>``."""
    _check(domain, n)
    images = np.empty((n, 3, resolution, resolution), np.float32)
    masks = np.empty((n, 1, resolution, resolution), np.float32)
    for i in range(n):
        image, mask = render(domain, i, resolution, seed)
        images[i] = normalise(image)
        masks[i, 0] = mask
    names = tuple(f"synthetic:{domain}/{i:04d}" for i in range(n))
    return SegArrays(images, masks, names, f"synthetic:{domain}")
