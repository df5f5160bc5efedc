"""Finding image/mask pairs: one reader per official dataset layout, plus a generic folder.

A reader only lists files; it never decodes them.  Each returns ``(pairs, problems)``: the pairs
sorted by image name (natural order, so ``2.tif`` comes before ``10.tif``), and a problem for every
image without a mask, mask without an image, missing folder or empty folder.  Decoding and pixel
checks are in ``validate``; preprocessing and caching in ``cache``.

Known layouts (folder names as published):

* Kvasir-SEG:   ``images/<id>.jpg`` + ``masks/<id>.jpg``
* CVC-ClinicDB: ``Original/<n>.tif`` + ``Ground Truth/<n>.tif``
* ISIC2018:     ``ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` +
  ``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png``
* DRIVE:        ``{training,test}/images/<id>_<split>.tif`` + ``1st_manual/<id>_manual1.gif``, the
  field of view in ``mask/<id>_<split>_mask.gif``; both splits pooled (our own pool split decides
  what is held out)
* PH2:          ``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` +
  ``IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp``
* BUSI:         ``Dataset_BUSI_with_GT/<class>/<name>.png`` + ``<name>_mask.png`` and possibly
  ``<name>_mask_1.png`` ..., united into one mask
* generic:      ``images/`` + ``masks/``, matched by file stem; a mask stem may add ``_mask`` or
  ``_segmentation``; any of .png .jpg .jpeg .bmp .tif .tiff .gif
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imaml_seg.data.validate import DataError, Problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
GENERIC_MASK_SUFFIXES = ("_segmentation", "_mask")
DATA_ENV = "IMAML_SEG_DATA"

Reader = Callable[[Path], tuple[list["Pair"], list[Problem]]]


@dataclass(frozen=True)
class Pair:
    """One image and its mask file(s); masks listed in ``extra_masks`` are OR-ed into ``mask``."""

    image: Path
    mask: Path
    fov: Path | None = None
    """DRIVE's field-of-view mask (pixels outside it are not part of the retina)."""
    extra_masks: tuple[Path, ...] = ()
    """Further masks of the same image (BUSI: one file per lesion), united with ``mask``."""

    @property
    def masks(self) -> tuple[Path, ...]:
        return (self.mask, *self.extra_masks)


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``2 < 10``, ``IMD2 < IMD10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (any case of the known suffixes, hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir()
         if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: natural_key(p.name),
    )


def _child(folder: Path, *names: str) -> Path | None:
    """The sub-folder of ``folder`` called one of ``names`` (exact first, then any case)."""
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    if not folder.is_dir():
        return None
    wanted = [n.lower() for n in names]
    children = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    for name in wanted:
        if name in children:
            return children[name]
    return None


def _sorted(pairs: list[Pair]) -> list[Pair]:
    return sorted(pairs, key=lambda p: natural_key(p.image.as_posix()))


def _missing(folder: Path, what: str) -> tuple[list[Pair], list[Problem]]:
    return [], [Problem(str(folder), f"folder not found ({what})")]


def _match_by_stem(
    image_dir: Path, mask_dir: Path, mask_suffixes: tuple[str, ...]
) -> tuple[list[Pair], list[Problem]]:
    """Pair the images of one folder with the masks of another by file stem.

    A mask matches an image of the same stem, or of its stem minus one of ``mask_suffixes``.
    """
    problems: list[Problem] = []
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            problems.append(Problem(str(folder), "folder not found"))
    if problems:
        return [], problems

    images: dict[str, Path] = {}
    for path in image_files(image_dir):
        if path.stem in images:
            problems.append(Problem(str(path), f"another image has the same name: "
                                    f"{images[path.stem].name}"))
            continue
        images[path.stem] = path
    if not images:
        problems.append(Problem(str(image_dir), "no images found (folder is empty)"))

    masks: dict[str, Path] = {}
    for path in image_files(mask_dir):
        key = path.stem
        if key not in images:
            for suffix in mask_suffixes:
                if key.endswith(suffix) and key[: -len(suffix)] in images:
                    key = key[: -len(suffix)]
                    break
        if key not in images:
            problems.append(Problem(str(path), f"mask has no image in {image_dir}"))
        elif key in masks:
            problems.append(Problem(str(path), f"image {images[key].name} already has a mask: "
                                    f"{masks[key].name}"))
        else:
            masks[key] = path

    pairs = []
    for stem, image in images.items():
        if stem in masks:
            pairs.append(Pair(image, masks[stem]))
        else:
            problems.append(Problem(str(image), f"image has no mask in {mask_dir}"))
    return _sorted(pairs), problems


def read_kvasir_seg(root: Path) -> tuple[list[Pair], list[Problem]]:
    """Kvasir-SEG: ``images/<id>.jpg`` and ``masks/<id>.jpg``."""
    root = Path(root)
    return _match_by_stem(root / "images", root / "masks", ())


def read_cvc_clinicdb(root: Path) -> tuple[list[Pair], list[Problem]]:
    """CVC-ClinicDB: ``Original/<n>.tif`` and ``Ground Truth/<n>.tif``."""
    root = Path(root)
    return _match_by_stem(root / "Original", root / "Ground Truth", ())


def read_isic2018(root: Path) -> tuple[list[Pair], list[Problem]]:
    """ISIC 2018 Task 1: ``..._Input/ISIC_<id>.jpg``, ``..._GroundTruth/ISIC_<id>_segmentation``."""
    root = Path(root)
    return _match_by_stem(
        root / "ISIC2018_Task1-2_Training_Input",
        root / "ISIC2018_Task1_Training_GroundTruth",
        ("_segmentation",),
    )


def read_drive(root: Path) -> tuple[list[Pair], list[Problem]]:
    """DRIVE, training and test pooled: image, ``1st_manual`` vessels, ``mask`` field of view."""
    root = Path(root)
    pairs: list[Pair] = []
    problems: list[Problem] = []
    splits = [s for s in ("training", "test") if (root / s / "images").is_dir()]
    if not splits:
        return _missing(root / "training" / "images", "expected training/images and test/images")
    for split in splits:
        manual_dir, fov_dir = root / split / "1st_manual", root / split / "mask"
        manuals = {p.stem: p for p in image_files(manual_dir)}
        fovs = {p.stem: p for p in image_files(fov_dir)}
        used: set[str] = set()
        images_dir = root / split / "images"
        images = image_files(images_dir)
        if not images:
            problems.append(Problem(str(images_dir), "no images found"))
        for image in images:
            ident = image.stem.split("_")[0]
            manual = manuals.get(f"{ident}_manual1")
            if manual is None:
                problems.append(Problem(str(image), f"image has no mask {ident}_manual1.gif "
                                        f"in {manual_dir}"))
                continue
            used.add(manual.stem)
            fov = fovs.get(f"{image.stem}_mask")
            if fov is None:
                problems.append(Problem(str(image), f"no field-of-view mask {image.stem}_mask.gif "
                                        f"in {fov_dir}", "warning"))
            pairs.append(Pair(image, manual, fov))
        for stem, manual in manuals.items():
            if stem not in used:
                problems.append(Problem(str(manual), f"mask has no image in {images_dir}"))
    return _sorted(pairs), problems


def _find_by_stem(folder: Path, stem: str) -> Path | None:
    for path in image_files(folder):
        if path.stem == stem:
            return path
    return None


def _ph2_images_dir(root: Path) -> Path | None:
    for candidate in (root / "PH2 Dataset images", root / "PH2Dataset" / "PH2 Dataset images"):
        if candidate.is_dir():
            return candidate
    if root.is_dir() and any(p.is_dir() and p.name.startswith("IMD") for p in root.iterdir()):
        return root  # the root is 'PH2 Dataset images' itself
    return None


def read_ph2(root: Path) -> tuple[list[Pair], list[Problem]]:
    """PH2: ``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` and ``_lesion``.

    ``root`` may be ``PH2Dataset/`` (holding ``PH2 Dataset images``), the folder above it, or
    ``PH2 Dataset images`` itself.
    """
    root = Path(root)
    images_dir = _ph2_images_dir(root)
    if images_dir is None:
        return _missing(root / "PH2 Dataset images", "expected 'PH2 Dataset images/IMDxxx/'")
    pairs: list[Pair] = []
    problems: list[Problem] = []
    cases = sorted((p for p in images_dir.iterdir() if p.is_dir() and p.name.startswith("IMD")),
                   key=lambda p: natural_key(p.name))
    if not cases:
        problems.append(Problem(str(images_dir), "no IMDxxx case folders found"))
    for case in cases:
        name = case.name
        image = _find_by_stem(case / f"{name}_Dermoscopic_Image", name)
        mask = _find_by_stem(case / f"{name}_lesion", f"{name}_lesion")
        if image is None and mask is None:
            problems.append(Problem(str(case), "case folder has neither image nor lesion mask"))
        elif image is None:
            problems.append(Problem(str(mask), f"mask has no image {name}_Dermoscopic_Image/"
                                    f"{name}.bmp"))
        elif mask is None:
            problems.append(Problem(str(image), f"image has no mask {name}_lesion/"
                                    f"{name}_lesion.bmp"))
        else:
            pairs.append(Pair(image, mask))
    return _sorted(pairs), problems


_BUSI_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<index>\d+))?$")


def read_busi(root: Path) -> tuple[list[Pair], list[Problem]]:
    """BUSI: ``<class>/<name>.png`` with ``<name>_mask.png`` (+ ``_mask_1`` ...), united.

    ``root`` may be ``Dataset_BUSI_with_GT`` or the folder holding it.  The 'normal' class has empty
    masks; they are kept (and reported as warnings by validation).
    """
    root = Path(root)
    base = _child(root, "Dataset_BUSI_with_GT") or root
    if not base.is_dir():
        return _missing(base, "expected Dataset_BUSI_with_GT/<class>/")
    pairs: list[Pair] = []
    problems: list[Problem] = []
    classes = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: natural_key(p.name))
    for folder in classes:
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in image_files(folder):
            match = _BUSI_MASK.match(path.stem)
            if match:
                index = int(match["index"]) if match["index"] else 0
                masks.setdefault(match["base"], []).append((index, path))
            else:
                images[path.stem] = path
        for stem, image in images.items():
            found = [p for _, p in sorted(masks.pop(stem, []))]
            if not found:
                problems.append(Problem(str(image), f"image has no mask {stem}_mask.png"))
                continue
            pairs.append(Pair(image, found[0], extra_masks=tuple(found[1:])))
        for stem, rest in masks.items():
            for _, path in rest:
                problems.append(Problem(str(path), f"mask has no image {stem}.png in {folder}"))
    if not pairs and not problems:
        problems.append(Problem(str(base), "no images found (expected <class>/<name>.png)"))
    return _sorted(pairs), problems


def read_generic(root: Path) -> tuple[list[Pair], list[Problem]]:
    """Any folder with ``images/`` and ``masks/``, matched by stem (``_mask`` suffix allowed)."""
    root = Path(root)
    image_dir = _child(root, "images") or root / "images"
    mask_dir = _child(root, "masks") or root / "masks"
    return _match_by_stem(image_dir, mask_dir, GENERIC_MASK_SUFFIXES)


KNOWN_DATASETS: dict[str, Reader] = {
    "Kvasir-SEG": read_kvasir_seg,
    "CVC-ClinicDB": read_cvc_clinicdb,
    "ISIC2018": read_isic2018,
    "DRIVE": read_drive,
    "PH2": read_ph2,
    "BUSI": read_busi,
}
"""Canonical dataset name -> reader; the name is also the folder looked for under a data root."""

FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "Kvasir-SEG": ("Kvasir-SEG", "Kvasir_SEG", "kvasir"),
    "CVC-ClinicDB": ("CVC-ClinicDB", "CVC_ClinicDB", "CVC-612"),
    "ISIC2018": ("ISIC2018", "ISIC-2018", "ISIC_2018"),
    "DRIVE": ("DRIVE",),
    "PH2": ("PH2", "PH2Dataset", "PH2_Dataset"),
    "BUSI": ("BUSI", "Dataset_BUSI_with_GT"),
}
"""Folder names (compared ignoring case) under which each known dataset is found."""


def canonical_name(name: str) -> str | None:
    """The canonical name of a known dataset given its name or a folder alias, else None."""
    lowered = name.strip().lower()
    for canonical, aliases in FOLDER_ALIASES.items():
        if lowered in (a.lower() for a in aliases):
            return canonical
    return None


def find_datasets(data_root: Path) -> dict[str, Path]:
    """Known datasets present directly under ``data_root``: canonical name -> folder."""
    data_root = Path(data_root)
    found: dict[str, Path] = {}
    if not data_root.is_dir():
        return found
    for name, aliases in FOLDER_ALIASES.items():
        folder = _child(data_root, *aliases)
        if folder is not None:
            found[name] = folder
    return found


def detect_layout(folder: Path) -> str | None:
    """The known dataset whose official layout ``folder`` has, 'generic', or None."""
    folder = Path(folder)
    if (folder / "Original").is_dir() and (folder / "Ground Truth").is_dir():
        return "CVC-ClinicDB"
    if (folder / "ISIC2018_Task1-2_Training_Input").is_dir():
        return "ISIC2018"
    if any((folder / s / "1st_manual").is_dir() for s in ("training", "test")):
        return "DRIVE"
    if _ph2_images_dir(folder) is not None:
        return "PH2"
    if _child(folder, "images") and _child(folder, "masks"):
        return "Kvasir-SEG" if canonical_name(folder.name) == "Kvasir-SEG" else "generic"
    if _child(folder, "Dataset_BUSI_with_GT") or any(
        p.is_dir() and any(_BUSI_MASK.match(f.stem) for f in image_files(p))
        for p in folder.iterdir()
    ):
        return "BUSI"
    return None


def data_root_from(arg: str | Path | None) -> Path | None:
    """The data root: ``arg`` if given, else ``$IMAML_SEG_DATA``, else None."""
    value = arg if arg not in (None, "") else os.environ.get(DATA_ENV) or None
    return None if value is None else Path(value).expanduser()


def resolve_dataset(spec: str, data_root: Path | None) -> tuple[str, Path, Reader]:
    """``(name, folder, reader)`` for a known dataset name or a folder path.

    A known name (or alias) is looked up under ``data_root``; anything else must be a folder
    (absolute, relative to the working directory, or relative to ``data_root``) whose layout is
    detected from its contents.
    """
    known = canonical_name(spec)
    if known is not None and not Path(spec).is_dir():
        if data_root is None:
            raise DataError(f"dataset '{spec}' is looked up in the data root, which is not set: "
                            f"pass --data-root DIR or set {DATA_ENV}")
        data_root = Path(data_root)
        if not data_root.is_dir():
            raise DataError("data root does not exist" if not data_root.exists()
                            else "data root is not a folder", data_root)
        found = find_datasets(data_root)
        if known not in found:
            listed = ", ".join(found) or "none of the known datasets"
            aliases = ", ".join(FOLDER_ALIASES[known])
            raise DataError(f"{known} not found (looked for a folder named {aliases}); "
                            f"found: {listed}", data_root)
        return known, found[known], KNOWN_DATASETS[known]

    folder = Path(spec).expanduser()
    if not folder.is_dir() and data_root is not None and (Path(data_root) / spec).is_dir():
        folder = Path(data_root) / spec
    if not folder.is_dir():
        raise DataError(f"unknown dataset '{spec}': neither a known name "
                        f"({', '.join(KNOWN_DATASETS)}) nor a folder")
    if not any(folder.iterdir()):
        raise DataError("folder is empty", folder)
    layout = detect_layout(folder)
    if layout is None:
        raise DataError("no dataset layout found: expected images/ and masks/ sub-folders "
                        f"(or the official layout of {', '.join(KNOWN_DATASETS)})", folder)
    if layout == "generic":
        return folder.resolve().name, folder, read_generic
    return layout, folder, KNOWN_DATASETS[layout]


def read_dataset(spec: str, data_root: Path | None) -> tuple[list[Pair], list[Problem]]:
    """The pairs of a known dataset (under ``data_root``) or of a folder, and the readers' problems.

    Raises DataError when the data root is missing, the dataset is not found, or no pair is found.
    """
    _, folder, reader = resolve_dataset(spec, data_root)
    pairs, problems = reader(folder)
    if not pairs:
        shown = "; ".join(str(p) for p in problems[:3]) or "no image/mask pairs"
        raise DataError(f"no image/mask pairs found ({shown})", folder)
    return pairs, problems
