"""Run configuration as frozen dataclasses, with presets stored as TOML files.

One word per concept, the same in code, config files and the CLI: ``shots``, ``query_size``,
``meta_batch_size``, ``inner_steps``, ``inner_lr``, ``lam``, ``cg_steps``, ``meta_lr``,
``meta_steps``.  A preset (``presets/<name>.toml``) holds any subset of the sections below;
what it leaves out keeps the dataclass default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

ALGORITHMS = ("imaml", "maml", "fomaml", "reptile", "transfer", "scratch")
SUPPORT_CV_RULES = ("best", "one_se", "paired_se")
SUPPORT_CV_RULE_WORDS = {
    "best": ("", ""),
    "one_se": ("one-SE rule", "one-standard-error rule"),
    "paired_se": ("paired-SE rule", "paired one-standard-error rule"),
}
"""Each support-CV rule's short and long name in messages and reports (empty: the default)."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how tasks are drawn from them."""

    resolution: int = 64
    """Square side, in pixels, that every image and mask is resized (stretched) to."""
    shots: int = 5
    """Support pairs per task (k)."""
    query_size: int = 5
    """Query pairs per task during meta-training."""
    test_fraction: float = 0.5
    """Share of each dataset held out as its test pool (never used as support)."""
    split_seed: int = 0
    """Seed of the fixed adaptation/test pool split of every dataset."""
    augment: bool = True
    """Random flips and 90-degree rotations of support and query images during meta-training."""


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net: MONAI BasicUNet with instance norm (no running statistics)."""

    features: tuple[int, int, int, int, int, int] = (8, 16, 32, 64, 128, 8)
    norm: str = "instance"
    """'instance' (affine InstanceNorm) or 'group' (GroupNorm); never BatchNorm."""


@dataclass(frozen=True)
class InnerConfig:
    """The inner loop, ``adapt()``, shared by meta-training and evaluation."""

    inner_steps: int = 10
    inner_lr: float = 0.1
    optimizer: str = "sgd"
    """'sgd' or 'adam'."""
    lam: float = 1.0
    """Proximal strength lambda of ``lam/2 ||phi - theta||^2`` (iMAML only)."""


@dataclass(frozen=True)
class ImplicitConfig:
    """The linear solve ``(I + H/lam) v = g`` behind iMAML's meta-gradient."""

    cg_steps: int = 5
    damping: float = 0.0
    """Added to the diagonal of H: solves ``(I + (H + damping I)/lam) v = g``."""
    hessian: str = "ggn"
    """'exact' Hessian-vector products or 'ggn' (Gauss-Newton, positive semi-definite)."""
    rtol: float = 1e-10
    """Stop CG once ``||r|| <= rtol * ||g||``."""


@dataclass(frozen=True)
class MetaConfig:
    """The outer loop."""

    algorithm: str = "imaml"
    meta_steps: int = 200
    meta_batch_size: int = 4
    meta_lr: float = 1e-3
    val_every: int = 50
    """Meta-steps between validation rounds (0 disables validation)."""
    val_tasks: int = 8
    checkpoint_every: int = 25
    warm_start: str | None = None
    """Path of a checkpoint whose weights initialise theta (e.g. transfer pretraining)."""
    pretrain_steps: int = 300
    """Supervised steps on pooled source data when ``algorithm == 'transfer'``."""
    pretrain_batch_size: int = 16
    reptile_lr: float = 0.5
    """Outer interpolation rate of Reptile: ``theta += reptile_lr * (phi - theta)``."""
    max_grad_norm: float | None = None
    """Rescale each outer gradient (meta-gradient, pretraining gradient, Reptile's step) to at
    most this global L2 norm before the update; None leaves it as is.  One spike otherwise
    inflates Adam's second-moment estimate and shrinks every later step for ~1/(1 - beta2)
    steps."""
    start_weight: float = 0.0
    """Weight ``w`` of the query loss at ``theta`` itself (the start, zero inner steps) in the
    meta-objective ``L_query(phi(theta)) + w L_query(theta)`` of iMAML, MAML and FOMAML, so
    that the learned start segments without adaptation too; 0 is the plain meta-objective.
    Reptile, which has no meta-gradient, refuses a non-zero weight."""
    average_from: int = 0
    """From this meta-step on (1-based; 0 is off) keep the running mean of the meta-learner's
    ``theta`` after every outer step and ship that mean as the run's weights (stochastic weight
    averaging, Izmailov et al. 2018): it smooths the noise of the last meta-steps' task batches.
    Transfer and scratch do not read it."""
    pretrain_average_from: int = 0
    """The same for transfer: from this pretraining step on (1-based; 0 is off) ship the mean of
    its weights, so that weight averaging is a lever open to the supervised baseline too.  The
    meta-learners do not read it (a warm start reads the transfer checkpoint it names)."""
    lam_lr: float = 0.0
    """iMAML only: with a rate > 0, meta-learn one proximal strength per weight tensor along with
    ``theta`` (outer Adam at this rate on ``log lam``, starting at ``inner.lam``; the derivative
    is :func:`imaml_seg.meta.implicit.lam_meta_grad`), so that meta-training learns how far each
    tensor may move while adapting, not only where it starts.  The strengths travel in the
    checkpoint and are used at test time with ``eval.proximal``.  0 keeps ``inner.lam``.
    Transfer and scratch ignore it (a study's warm start is plain transfer); MAML, FOMAML and
    Reptile, which have no proximal term, refuse it."""
    task_shift: float = 0.0
    """Strength in [0, 1] of a synthetic domain shift drawn per meta-training task: every image of
    the task (support and query) gets the same random colour mixing, channel curve and zoom
    (:func:`imaml_seg.data.shift.shift_task`), so that adapting is needed on the sources as it is
    on an unseen target.  0 is off.  Transfer, which trains on pooled batches, reads
    ``pretrain_shift`` instead; validation tasks are never shifted."""
    pretrain_shift: float = 0.0
    """The same for transfer: each pretraining image under its own random shift of this
    strength (domain randomisation), so that the lever is open to the supervised baseline too.
    The meta-learners do not read it (a warm start reads the transfer checkpoint it names)."""
    lam_max: float = 10.0
    """Upper bound of the learned strengths (lower bound ``lam_max / 1e4``): with SGD the
    proximal pull ``1 - inner_lr * lam`` per step must stay above -1."""


@dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation on a target dataset."""

    shots: tuple[int, ...] = (5,)
    draws: int = 20
    """Random support sets per shot count; the same draws for every method."""
    test_size: int = 50
    """Images of the test pool scored per draw (0 means all)."""
    inner_steps: int = 50
    """Adaptation steps at test time (may differ from meta-training's)."""
    optimizer: str | None = None
    """Test-time optimizer, 'sgd' or 'adam'; None uses meta-training's ``inner.optimizer``."""
    inner_lr: float | None = None
    """Test-time step size; None uses meta-training's ``inner.inner_lr``."""
    augment_support: bool = False
    """Show each support pair flipped/rotated (one of the 8 dihedral transforms, a different
    one at each step) while adapting, so that k shots act as up to 8k."""
    tta: bool = False
    """Test-time augmentation: average the foreground probability over the 8 flips/rotations
    of each test image (mapped back), instead of predicting it once."""
    support_cv: bool = False
    """Choose the number of adaptation steps (0 up to ``inner_steps``) for each support set by
    cross-validation on its own pairs (``evaluation.support_cv_steps``), so that fine-tuning
    which lowers Dice on held-out shots is cut short or skipped.  One shot cannot be split: it
    adapts ``inner_steps``.  Costs up to 5 extra adaptations per support set."""
    support_cv_rule: str = "best"
    """How support cross-validation picks among the step counts (``evaluation.choose_steps``):
    'best' (the best mean held-out Dice) or 'one_se' (the fewest steps whose mean is within one
    standard error of the best, Breiman's one-standard-error rule: with 2-10 held-out shots the
    best mean is a noisy estimate, and fine-tuning must then clearly earn its steps) or
    'paired_se' (the same on the per-pair differences to the best: a gain seen on every held-out
    shot counts even when the shots differ widely in Dice)."""
    start_blend: float = 0.0
    """Fraction ``b`` of a warm-started run's start (the weights ``meta.warm_start`` names, e.g.
    transfer's) mixed into its learned weights before adapting: ``(1 - b) theta + b theta_start``
    (:func:`imaml_seg.checkpoint.blend_with_start`); 0 adapts from ``theta`` itself, 1 from the
    start."""
    blend_only_unadapted: bool = False
    """Use the ``start_blend`` weights only where no adaptation step is taken (``inner_steps`` 0,
    or support CV choosing 0 steps, whose 0-step candidate is then the blend); fine-tuning starts
    from ``theta`` as trained.  On unseen CVC-ClinicDB the blend scored higher than warm iMAML
    without fine-tuning and lower after it."""
    proximal: bool = False
    """Keep iMAML's proximal term ``lam/2 ||phi - theta||^2`` when adapting at test time.  Off by
    default: on the demo's unseen synthetic domain it lowered iMAML's 5-shot Dice from 0.83 to
    0.73 (20 steps, lam 2), because it stops phi short of the support optimum."""


def eval_inner(inner: InnerConfig, evaluation: EvalConfig) -> InnerConfig:
    """The inner loop used at test time: meta-training's, with the eval section's overrides."""
    return dataclasses.replace(
        inner,
        inner_steps=evaluation.inner_steps,
        optimizer=evaluation.optimizer or inner.optimizer,
        inner_lr=evaluation.inner_lr if evaluation.inner_lr is not None else inner.inner_lr,
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run; stored in every checkpoint."""

    sources: tuple[str, ...] = ("synthetic:0", "synthetic:1", "synthetic:2", "synthetic:3")
    target: str = "synthetic:7"
    seed: int = 0
    """Seeds the evaluation's support draws and test pools, and training unless ``train_seed``
    is set."""
    train_seed: int | None = None
    """Seeds training alone: the initialisation, the sampled tasks and batches, baselines' own
    randomness.  Another ``train_seed`` retrains a method and keeps every evaluation draw, so
    the retrains are compared draw by draw (training noise apart from draw noise)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says which and why."""


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        default = getattr(cls(), key)
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[key] = _build(type(default), value, f"{where}.{key}")
        elif isinstance(default, tuple) or isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig from nested plain values (as read from TOML or JSON)."""
    config = _build(RunConfig, values, where)
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Nested plain values, JSON- and TOML-friendly."""
    return dataclasses.asdict(config)


def merge(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return ``config`` with nested ``overrides`` applied."""

    def deep(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            out[key] = deep(out[key], value) if isinstance(value, dict) and key in out else value
        return out

    return from_dict(deep(to_dict(config), overrides))


def preset_names() -> list[str]:
    """Presets shipped with the package."""
    folder = resources.files("imaml_seg") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load(name_or_path: str | Path) -> RunConfig:
    """Load a preset by name (``cpu``, ``paper``, ...) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        where = str(path)
    else:
        if str(name_or_path) not in preset_names():
            raise ConfigError(
                f"unknown preset '{name_or_path}' (presets: {', '.join(preset_names())})"
            )
        text = (resources.files("imaml_seg") / "presets" / f"{name_or_path}.toml").read_text()
        where = f"preset {name_or_path}"
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML ({err})") from None
    return from_dict(values, where)


def validate(config: RunConfig) -> None:
    """Raise ConfigError on values that cannot work."""
    checks = [
        (config.meta.algorithm in ALGORITHMS, f"meta.algorithm must be one of {ALGORITHMS}"),
        (config.data.resolution >= 32, "data.resolution must be at least 32 (U-Net depth 4)"),
        (config.data.resolution % 16 == 0, "data.resolution must be a multiple of 16 (U-Net)"),
        (config.data.shots >= 1, "data.shots must be at least 1"),
        (config.data.query_size >= 1, "data.query_size must be at least 1"),
        (0.0 < config.data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)"),
        (len(config.model.features) == 6, "model.features needs 6 widths"),
        (config.model.norm in ("instance", "group"), "model.norm must be 'instance' or 'group'"),
        (config.inner.optimizer in ("sgd", "adam"), "inner.optimizer must be 'sgd' or 'adam'"),
        (config.inner.inner_steps >= 0, "inner.inner_steps must be >= 0"),
        (config.eval.optimizer in (None, "sgd", "adam"), "eval.optimizer must be 'sgd' or 'adam'"),
        (config.eval.inner_lr is None or config.eval.inner_lr > 0, "eval.inner_lr must be > 0"),
        (config.eval.inner_steps >= 0, "eval.inner_steps must be >= 0"),
        (0.0 <= config.eval.start_blend <= 1.0, "eval.start_blend must be in [0, 1]"),
        (
            config.eval.support_cv_rule in SUPPORT_CV_RULES,
            f"eval.support_cv_rule must be one of {SUPPORT_CV_RULES}",
        ),
        (config.inner.lam > 0, "inner.lam must be > 0"),
        (config.implicit.cg_steps >= 1, "implicit.cg_steps must be >= 1"),
        (config.implicit.hessian in ("exact", "ggn"), "implicit.hessian must be 'exact' or 'ggn'"),
        (config.implicit.damping >= 0, "implicit.damping must be >= 0"),
        (config.implicit.rtol > 0, "implicit.rtol must be > 0"),
        (
            config.inner.optimizer != "sgd" or config.inner.inner_lr * config.inner.lam < 2,
            "inner.inner_lr * inner.lam must be < 2, or proximal SGD diverges",
        ),
        (config.meta.meta_batch_size >= 1, "meta.meta_batch_size must be >= 1"),
        (config.meta.start_weight >= 0, "meta.start_weight must be >= 0"),
        (
            0 <= config.meta.average_from <= config.meta.meta_steps,
            "meta.average_from must be in [0, meta.meta_steps]",
        ),
        (
            0 <= config.meta.pretrain_average_from <= config.meta.pretrain_steps,
            "meta.pretrain_average_from must be in [0, meta.pretrain_steps]",
        ),
        (
            config.meta.start_weight == 0 or config.meta.algorithm != "reptile",
            "meta.start_weight needs a meta-gradient (imaml, maml, fomaml); Reptile has none",
        ),
        (
            config.meta.max_grad_norm is None or config.meta.max_grad_norm > 0,
            "meta.max_grad_norm must be > 0",
        ),
        (config.meta.lam_lr >= 0, "meta.lam_lr must be >= 0"),
        (0.0 <= config.meta.task_shift <= 1.0, "meta.task_shift must be in [0, 1]"),
        (0.0 <= config.meta.pretrain_shift <= 1.0, "meta.pretrain_shift must be in [0, 1]"),
        (
            config.meta.lam_lr == 0 or config.meta.algorithm not in ("maml", "fomaml", "reptile"),
            "meta.lam_lr (learned proximal strengths) is an iMAML setting",
        ),
        (
            config.meta.lam_lr == 0 or config.inner.lam <= config.meta.lam_max,
            "inner.lam must be <= meta.lam_max, the bound of learned strengths",
        ),
        (
            config.meta.lam_lr == 0
            or config.inner.optimizer != "sgd"
            or config.inner.inner_lr * config.meta.lam_max < 2,
            "inner.inner_lr * meta.lam_max must be < 2, or proximal SGD diverges",
        ),
        (len(config.sources) >= 1, "at least one source dataset is needed"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
