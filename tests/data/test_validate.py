"""Reading every image format the datasets use; every validation problem, naming its file."""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imaml_seg.data.readers import Pair
from imaml_seg.data.validate import (
    DataError,
    Problem,
    binarise,
    check_pair,
    load_image,
    load_mask,
    mask_grey_fraction,
    validate_pair,
    validate_pairs,
)
from tests.data.datafiles import disc, rgb, save

# ----------------------------------------------------------------------------- formats


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    pixels = rgb()
    image = load_image(save(tmp_path / "a.png", pixels))
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    np.testing.assert_array_equal(image, pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = rgb()[:, :, 0]
    image = load_image(save(tmp_path / "g.png", grey))
    assert image.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], grey)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    pixels = np.dstack([rgb(), np.full((24, 32), 7, np.uint8)])
    image = load_image(save(tmp_path / "a.png", pixels))
    np.testing.assert_array_equal(image, pixels[:, :, :3])


def test_palette_image_uses_its_colours(tmp_path: Path) -> None:
    indices = np.zeros((8, 8), np.uint8)
    indices[2:5, 2:5] = 1
    im = Image.fromarray(indices, "P")
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image = load_image(save(tmp_path / "p.png", im))
    assert tuple(image[0, 0]) == (10, 20, 30) and tuple(image[3, 3]) == (200, 100, 50)


def test_16bit_is_scaled_to_8bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 257 * 128]], np.uint16)
    image = load_image(save(tmp_path / "w.png", values))
    assert Image.open(tmp_path / "w.png").mode.startswith("I;16")
    np.testing.assert_array_equal(image[0, :, 0], [0, 100, 255, 128])


def test_16bit_holding_8bit_values_is_kept(tmp_path: Path) -> None:
    values = np.array([[0, 100, 255]], np.uint16)
    np.testing.assert_array_equal(load_image(save(tmp_path / "w.png", values))[0, :, 0],
                                  [0, 100, 255])


def test_16bit_rgb_tiff(tmp_path: Path) -> None:
    pixels = np.zeros((4, 5, 3), np.uint16)
    pixels[..., 0] = 65535
    tifffile.imwrite(tmp_path / "w.tif", pixels, photometric="rgb")
    assert tuple(load_image(tmp_path / "w.tif")[0, 0]) == (255, 0, 0)


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_one_bit_bmp(tmp_path: Path) -> None:
    bits = disc() > 0
    path = save(tmp_path / "m.bmp", Image.fromarray(bits).convert("1"))
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(load_mask(path), bits)
    assert set(np.unique(load_image(path))) == {0, 255}


def test_three_sample_minisblack_tiff_falls_back_to_tifffile(tmp_path: Path) -> None:
    """The raw CVC-ClinicDB frames: 3 samples declared MinIsBlack, which Pillow cannot open."""
    pixels = rgb(20, 30)
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    with pytest.raises(Exception):  # noqa: B017  (the point: Pillow alone fails)
        Image.open(path).load()
    np.testing.assert_array_equal(load_image(path), pixels)


def test_planar_tiff(tmp_path: Path) -> None:
    pixels = rgb(6, 7)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(pixels, -1, 0), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_array_equal(load_image(tmp_path / "p.tif"), pixels)


# ----------------------------------------------------------------------------- masks


def test_mask_threshold_at_128(tmp_path: Path) -> None:
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(load_mask(save(tmp_path / "m.png", grey)),
                                  [[False, False, True, True]])


def test_zero_one_mask_is_binary_not_empty(tmp_path: Path) -> None:
    labels = (disc() > 0).astype(np.uint8)  # values 0 and 1
    mask = load_mask(save(tmp_path / "m.png", labels))
    np.testing.assert_array_equal(mask, labels == 1)
    assert mask.any()


def test_16bit_mask(tmp_path: Path) -> None:
    values = (disc() > 0).astype(np.uint16) * 65535
    np.testing.assert_array_equal(load_mask(save(tmp_path / "m.png", values)), disc() > 0)


def test_rgb_jpeg_mask_is_thresholded(tmp_path: Path) -> None:
    mask = disc(64, 64, 20)
    path = save(tmp_path / "m.jpg", np.dstack([mask] * 3), quality=75)
    loaded = load_mask(path)
    assert (loaded != (mask > 0)).mean() < 0.01


def test_binarise_and_grey_fraction() -> None:
    grey = np.array([0, 10, 32, 33, 128, 223, 224, 255], np.uint8)
    assert mask_grey_fraction(grey) == pytest.approx(3 / 8)
    assert binarise(np.array([0, 1], np.uint8)).tolist() == [False, True]
    assert binarise(np.array([0, 1, 200], np.uint8)).tolist() == [False, False, True]


# ----------------------------------------------------------------------------- bad files


def test_random_bytes_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DataError, match="cannot read image") as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.png", rgb(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.jpg", rgb(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.jpg: cannot read image"):
        load_image(path)


def test_truncated_jpeg_found_by_validation(tmp_path: Path) -> None:
    """Validation decodes JPEG images at reduced size; a truncated one is still caught."""
    image = save(tmp_path / "cut.jpg", rgb(256, 256))
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    (problem,) = validate_pair(image, save(tmp_path / "m.png", disc(256, 256, 40)))
    assert problem.path == str(image) and problem.message.startswith("cannot read image")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone.png: file not found"):
        load_mask(tmp_path / "gone.png")


def test_zero_size_image(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 5), np.uint8))
    with pytest.raises(DataError, match="empty.tif: .*zero size"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    """An 11000 x 11000 PNG header (Pillow only warns at that size) must not be decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (11000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with warnings.catch_warnings(), pytest.raises(DataError, match="bomb.png: image too large"):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        load_image(path)


# ----------------------------------------------------------------------------- pairs


def test_good_pair_has_no_problems(tmp_path: Path) -> None:
    image = save(tmp_path / "i.png", rgb())
    mask = save(tmp_path / "m.png", disc())
    assert validate_pair(image, mask) == []


def test_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    image = save(tmp_path / "i.png", rgb(24, 32))
    mask = save(tmp_path / "m.png", disc(20, 32))
    (problem,) = validate_pair(image, mask)
    assert problem.path == str(mask) and problem.severity == "error"
    assert "32x20" in problem.message and "32x24" in problem.message


def test_mostly_grey_mask_is_an_error(tmp_path: Path) -> None:
    grey = disc().copy()
    grey[:12] = 100  # half the mask grey
    image, mask = save(tmp_path / "i.png", rgb()), save(tmp_path / "m.png", grey)
    (problem,) = validate_pair(image, mask)
    assert problem.path == str(mask)
    assert problem.message == "mask is not binary: 50.0% of pixels are grey"
    assert str(problem) == f"{mask}: mask is not binary: 50.0% of pixels are grey"


def test_few_grey_pixels_are_fine(tmp_path: Path) -> None:
    grey = disc().copy()
    grey[0, :7] = 100  # under 1 % grey, like CVC-ClinicDB's borders
    assert validate_pair(save(tmp_path / "i.png", rgb()), save(tmp_path / "m.png", grey)) == []


def test_empty_mask_is_a_warning(tmp_path: Path) -> None:
    image = save(tmp_path / "i.png", rgb())
    mask = save(tmp_path / "m.png", np.zeros((24, 32), np.uint8))
    (problem,) = validate_pair(image, mask)
    assert problem == Problem(str(mask), problem.message, "warning")
    assert "empty" in problem.message


def test_corrupt_image_and_missing_mask_both_reported(tmp_path: Path) -> None:
    image = tmp_path / "bad.jpg"
    image.write_bytes(b"\xff\xd8\xff" + bytes(100))
    problems = validate_pair(image, tmp_path / "missing.png")
    assert [p.path for p in problems] == [str(image), str(tmp_path / "missing.png")]
    assert all(p.severity == "error" for p in problems)


def test_validate_pairs_reports_everything(tmp_path: Path) -> None:
    good = Pair(save(tmp_path / "g.png", rgb()), save(tmp_path / "gm.png", disc()))
    small = Pair(save(tmp_path / "s.png", rgb()), save(tmp_path / "sm.png", disc(10, 10)))
    empty = Pair(save(tmp_path / "e.png", rgb()), save(tmp_path / "em.png", disc() * 0))
    broken = tmp_path / "b.png"
    broken.write_bytes(b"not an image")
    bad = Pair(broken, good.mask)
    problems = validate_pairs([good, small, empty, bad])
    assert [(Path(p.path).name, p.severity) for p in problems] == [
        ("sm.png", "error"), ("em.png", "warning"), ("b.png", "error")
    ]


def test_extra_masks_are_united(tmp_path: Path) -> None:
    left, right = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    left[:, :3], right[:, 7:] = 255, 255
    image = save(tmp_path / "i.png", rgb(10, 10))
    checked = check_pair(image, [save(tmp_path / "a.png", left), save(tmp_path / "b.png", right)])
    assert checked.ok and checked.mask is not None
    np.testing.assert_array_equal(checked.mask, (left > 0) | (right > 0))


def test_extra_mask_of_another_size(tmp_path: Path) -> None:
    image = save(tmp_path / "i.png", rgb(10, 10))
    extra = save(tmp_path / "b.png", np.zeros((10, 12), np.uint8))
    problems = validate_pair(image, save(tmp_path / "a.png", disc(10, 10, 3)), extra_masks=[extra])
    assert [p.path for p in problems] == [str(extra)]


def test_fov_checked(tmp_path: Path) -> None:
    image, mask = save(tmp_path / "i.png", rgb()), save(tmp_path / "m.png", disc())
    fov = save(tmp_path / "fov.gif", np.full((5, 5), 255, np.uint8))
    (problem,) = validate_pair(image, mask, fov=fov)
    assert problem.path == str(fov) and "field-of-view" in problem.message


# ----------------------------------------------------------------------------- fuzzing

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00",
         b"MM\x00*", b"II+\x00"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(magic=st.sampled_from(MAGIC), data=st.binary(max_size=400))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, magic: bytes,
                           data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.img"
    path.write_bytes(magic + data)
    for loader in (load_image, load_mask):
        try:
            out = loader(path)
        except DataError as err:
            assert str(path) in str(err)
            continue
        assert out.ndim in (2, 3) and out.shape[0] > 0 and out.shape[1] > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(1, 40) | st.sampled_from([1, 3000]),
    w=st.integers(1, 40) | st.sampled_from([1, 3000]),
    fmt=st.sampled_from(["png", "jpeg", "bmp", "gif", "tiff"]),
    mode=st.sampled_from(["L", "RGB", "RGBA", "1", "I;16"]),
    cut=st.sampled_from([None, 0.3, 0.9]),
)
def test_fuzz_odd_shapes(tmp_path_factory: pytest.TempPathFactory, h: int, w: int, fmt: str,
                         mode: str, cut: float | None) -> None:
    pixels = np.random.default_rng(h * w).integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(pixels, "RGBA").convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)
    buffer = io.BytesIO()
    try:
        im.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to read
    raw = buffer.getvalue()
    path = tmp_path_factory.mktemp("shapes") / f"x.{fmt}"
    path.write_bytes(raw if cut is None else raw[: max(1, int(len(raw) * cut))])
    for loader, ndim in ((load_image, 3), (load_mask, 2)):
        try:
            out = loader(path)
        except DataError as err:
            assert cut is not None, f"an intact {fmt} {mode} {h}x{w} failed: {err}"
            assert str(path) in str(err)
            continue
        assert out.shape[:2] == (h, w) and out.ndim == ndim
        assert out.dtype == (np.uint8 if ndim == 3 else np.bool_)
