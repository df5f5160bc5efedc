"""Leave-one-dataset-out study: train every method on the sources, score it on an unseen target.

A study is a TOML file (``experiments/<name>.toml``)::

    name = "unseen_polyp"
    preset = "cpu"                       # or a config file
    sources = ["Kvasir-SEG", "ISIC2018", "DRIVE"]
    target = "CVC-ClinicDB"
    methods = ["scratch", "transfer", "imaml", "imaml_warm", ...]
    [overrides]                          # optional, nested like a config file
    meta = { meta_steps = 200 }

A study with more training steps may start its units from another's (``extend_from =
"unseen_polyp"``): a unit with no run of its own continues that study's run of the same method to
its own ``meta_steps`` / ``pretrain_steps`` (the weights of one longer run; nothing else
that training reads may differ, see :func:`~imaml_seg.meta.trainer.extends`).  A study may
reuse another's trained units (``train_from = "unseen_polyp"``) when it differs from it only in
its ``[eval]`` section, and may choose each method's test-time settings on validation tasks of
the *sources* (never the target) before scoring it: ``[tune]`` lists stages of candidate
``[eval]`` overrides; each stage keeps its best candidate (ties go to the first) and the next
stage tries its own on top of it::

    [tune]
    tasks = 8
    stages = [[{}, {inner_steps = 100}, {optimizer = "adam", inner_lr = 0.001}],
              [{}, {augment_support = true}], [{}, {tta = true}]]

Studies that choose from the same menu name it instead (``menu = "test_time"`` reads the
``stages`` of ``experiments/menus/test_time.toml``).

It runs as small units, each skipped when its output exists, so an interrupted study picks up
where it stopped: one training run per method (``runs/<name>/<method>/``, checkpoints, not
committed), one choice of test-time settings per method when the study tunes them
(``results/<name>/<method>.tune.json``) and one evaluation per method
(``results/<name>/<method>.json``, committed).  The report step then writes
``results/<name>.json`` (every per-draw score, summaries, paired Wilcoxon tests of iMAML against
each method over draws and over test images), a Dice-vs-shots plot, learning curves and an
overlay grid.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from imaml_seg.baselines import build_baseline
from imaml_seg.checkpoint import blend_with_start, load_checkpoint, save_checkpoint
from imaml_seg.config import SUPPORT_CV_RULE_WORDS, ConfigError, RunConfig, load, merge, to_dict
from imaml_seg.data.cache import SegArrays, load_arrays
from imaml_seg.data.tasks import Task, TaskSampler, draw_support, test_pool
from imaml_seg.data.validate import DataError
from imaml_seg.evaluation import (
    AdaptedModel,
    TestTimeAugmented,
    evaluate,
    format_p_pair,
    paired_wilcoxon,
    paired_wilcoxon_images,
    summarise,
)
from imaml_seg.meta.trainer import (
    CHECKPOINT,
    LOG,
    Paths,
    device_default,
    extends,
    init_theta,
    train,
    write_config,
)
from imaml_seg.metrics import dice
from imaml_seg.model import build_model
from imaml_seg.plots import dice_vs_shots, learning_curves, overlay_grid

THETA_METHODS = ("scratch", "transfer", "fomaml", "maml", "reptile", "imaml", "imaml_warm")
BASELINES = ("prototype", "incontext")
METHODS = THETA_METHODS + BASELINES
REFERENCE = "imaml"


@dataclass(frozen=True)
class Study:
    name: str
    config: RunConfig
    methods: tuple[str, ...]
    baseline_steps: int = 300
    """Episodic training steps of the few-shot baselines (meta-batches of tasks)."""
    train_from: str | None = None
    """Another study (``experiments/<train_from>.toml``) whose trained units this one reuses."""
    tune_stages: tuple[tuple[dict[str, Any], ...], ...] = ()
    """Stages of candidate ``[eval]`` overrides, scored on source validation tasks."""
    tune_tasks: int = 8
    """Source validation tasks (``data.shots`` support + ``TUNE_QUERY`` query pairs each)."""
    tune_per_shot: bool = False
    """Choose the settings once per shot count of ``[eval]``, on validation tasks with that
    many support pairs (instead of once, at ``data.shots``)."""
    extend_from: str | None = None
    """A study with smaller step budgets whose runs this one's units continue (when present)."""

    @classmethod
    def from_file(cls, path: Path) -> Study:
        if not path.is_file():
            raise ConfigError(f"{path}: study file not found")
        spec = _read_toml(path)
        base = load(spec.get("preset", "cpu"))
        overrides = dict(spec.get("overrides", {}))
        for key in ("sources", "target", "seed", "train_seed"):
            if key in spec:
                overrides[key] = spec[key]
        methods = tuple(spec.get("methods", METHODS))
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"{path}: unknown methods {unknown} (known: {', '.join(METHODS)})")
        config = merge(base, overrides)
        if config.eval.start_blend and set(methods) != {"imaml_warm"}:
            raise ConfigError(
                f"{path}: eval.start_blend mixes in the weights a run was warm-started from; "
                f"only imaml_warm has them, so list it alone (methods: {', '.join(methods)})"
            )
        tune = spec.get("tune", {})
        unknown = sorted(set(tune) - {"stages", "menu", "tasks", "per_shot"})
        if unknown:
            raise ConfigError(f"{path}: unknown [tune] keys {unknown} (known: stages, menu, "
                              "tasks, per_shot)")
        listed, origin = tune.get("stages", []), path
        if "menu" in tune:
            if "stages" in tune:
                raise ConfigError(f"{path}: [tune] gives both stages and menu; keep one")
            origin = menu_path(path, tune["menu"])
            listed = _read_toml(origin).get("stages")
        if not isinstance(listed, list) or not all(
            isinstance(stage, list) and all(isinstance(c, dict) for c in stage) for stage in listed
        ):
            raise ConfigError(f"{origin}: needs stages = [[{{...}}, ...], ...] (lists of [eval] "
                              "overrides)")
        stages = tuple(tuple(dict(c) for c in stage) for stage in listed)
        for stage in stages:
            for candidate in stage:
                try:
                    merge(config, {"eval": candidate})
                except ConfigError as err:
                    raise ConfigError(f"{path}: tune candidate {candidate}: {err}") from None
        study = cls(
            spec.get("name", path.stem),
            config,
            methods,
            spec.get("baseline_steps", 300),
            spec.get("train_from"),
            stages,
            tune.get("tasks", 8),
            bool(tune.get("per_shot", False)),
            spec.get("extend_from"),
        )
        if study.train_from is not None:
            study.trained_by(path.parent)  # fail early if it cannot reuse those units
        return study

    def trained_by(self, folder: Path) -> Study:
        """The study whose trained units this one uses (itself unless ``train_from``)."""
        if self.train_from is None:
            return self
        spec = folder / f"{self.train_from}.toml"
        other = Study.from_file(spec)
        if other.train_from is not None:
            raise ConfigError(f"{spec}: train_from cannot chain (it reuses {other.train_from})")
        if replace(other.config, eval=self.config.eval) != self.config or (
            other.baseline_steps != self.baseline_steps
        ):
            raise ConfigError(
                f"study {self.name}: train_from = '{self.train_from}' needs the same training "
                f"settings as {spec} (only [eval] may differ)"
            )
        missing = sorted(set(self.methods) - set(other.methods))
        if missing:
            raise ConfigError(f"study {self.name}: {spec} does not train {missing}")
        return other

    def draw_settings(self) -> dict[str, Any]:
        """What decides the study's support draws and test images: two studies with equal
        settings score the same draws, so their units can be compared draw by draw."""
        c = self.config
        return {
            "target": c.target,
            "resolution": c.data.resolution,
            "seed": c.seed,
            "test_fraction": c.data.test_fraction,
            "split_seed": c.data.split_seed,
            "test_size": c.eval.test_size,
        }

    def check_same_draws(self, other: Study) -> None:
        """Raise unless ``other`` scores the same support draws and test images."""
        if self.draw_settings() != other.draw_settings():
            raise ConfigError(
                f"{self.name} and {other.name} score different draws or test images: "
                f"{self.draw_settings()} vs {other.draw_settings()}"
            )


def menu_path(study: Path, name: Any) -> Path:
    """``menus/<name>.toml`` beside ``study``: one menu of candidate test-time settings (its
    ``stages``) that several studies choose from (``[tune] menu = "<name>"``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{study}: [tune] menu must name a file of {study.parent / 'menus'}")
    menu = study.parent / "menus" / f"{name}.toml"
    if not menu.is_file():
        known = ", ".join(sorted(p.stem for p in menu.parent.glob("*.toml"))) or "none"
        raise ConfigError(f"{study}: [tune] menu '{name}': {menu} not found (menus: {known})")
    return menu


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def machine() -> dict[str, Any]:
    """Where a result was measured."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def method_config(
    study: Study, method: str, runs: Path, evaluation: dict[str, Any] | None = None
) -> RunConfig:
    """The run config of one method: the study's config with the method's algorithm (and
    ``evaluation``'s ``[eval]`` overrides, e.g. its tuned test-time settings)."""
    algorithm = "imaml" if method == "imaml_warm" else method
    meta: dict[str, Any] = {"algorithm": algorithm if algorithm in THETA_METHODS else "scratch"}
    if method == "imaml_warm":
        meta["warm_start"] = str(runs / "transfer" / "checkpoint.safetensors")
    return merge(study.config, {"meta": meta, "eval": evaluation or {}})


def train_unit(study: Study, method: str, paths: Paths, runs: Path, quiet: bool) -> None:
    """Train one method (resuming a partial run); a no-op when it has finished."""
    if method == "imaml_warm":
        train_unit(study, "transfer", paths, runs, quiet)
    config = method_config(study, method, runs)
    out = runs / method
    if study.extend_from is not None and method not in BASELINES and method != "scratch":
        _continue_from(study, method, config, out)
    if method not in BASELINES and (out / CHECKPOINT).exists():
        _check_trained_as(study, load_checkpoint(out / CHECKPOINT).config, config, out)
    if method in BASELINES:
        _train_baseline(study, method, config, paths, out, quiet)
    elif method != "scratch":
        train(config, replace(paths, out_dir=out), resume=True, quiet=quiet)


def _check_trained_as(study: Study, old: RunConfig, config: RunConfig, out: Path) -> None:
    """Refuse a unit folder trained with other settings than the study's: resuming would go on
    with the checkpoint's own and report them under the study's name.  A warm start named by
    another path (the repository moved) counts as the same when it holds the same weights or is
    gone."""
    was, warm = old.meta.warm_start, config.meta.warm_start
    if None not in (was, warm) and was != warm:
        if not Path(was).exists() or _same_weights(Path(was), Path(warm)):
            old = replace(old, meta=replace(old.meta, warm_start=warm))
    if old == config or extends(old, config):
        return
    a, b = _flat(to_dict(old)), _flat(to_dict(config))
    differ = ", ".join(
        f"{k} = {a.get(k)!r} there, {b.get(k)!r} here"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and not k.startswith("eval.")
    )
    raise ConfigError(
        f"study {study.name}: {out} was trained with other settings ({differ}); move it away "
        "to train this unit anew, or restore the study's settings"
    )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _continue_from(study: Study, method: str, config: RunConfig, out: Path) -> None:
    """Seed ``out`` with ``study.extend_from``'s run of ``method`` (when it has one and ``out``
    has none), for :func:`train` to continue to this study's step budget.

    A warm-started run continues only from the same warm-start weights; from other ones (transfer
    trained longer here) it is trained from the start, with a warning."""
    source = out.parents[1] / str(study.extend_from) / method
    if (out / CHECKPOINT).exists() or not (source / CHECKPOINT).exists():
        return
    ckpt = load_checkpoint(source / CHECKPOINT)
    old, warm = ckpt.config, config.meta.warm_start
    if warm is not None and old.meta.warm_start not in (None, warm):
        if not _same_weights(Path(old.meta.warm_start), Path(warm)):
            warnings.warn(
                f"study {study.name}: {method} starts from other weights ({warm}) than "
                f"{source}'s run; trained from the start",
                stacklevel=2,
            )
            return
        old = replace(old, meta=replace(old.meta, warm_start=warm))
    if not extends(old, config):
        raise ConfigError(
            f"study {study.name}: extend_from = '{study.extend_from}': {source} was trained "
            f"with other settings than {method} here (only the steps it trains may grow and "
            "[eval] differ)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if (source / LOG).exists():
        shutil.copy2(source / LOG, out / LOG)
    write_config(out, old)
    save_checkpoint(out / CHECKPOINT, replace(ckpt, config=old))


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same ``theta`` (both must exist)."""
    if not (a.is_file() and b.is_file()):
        return False
    x, y = load_checkpoint(a).theta, load_checkpoint(b).theta
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _sources(config: RunConfig, paths: Paths) -> list[SegArrays]:
    return [
        load_arrays(s, config.data.resolution, data_root=paths.data_root, cache_dir=paths.cache_dir)
        for s in config.sources
    ]


def _train_baseline(
    study: Study, method: str, config: RunConfig, paths: Paths, out: Path, quiet: bool
) -> None:
    weights = out / "weights.safetensors"
    if weights.exists():
        return
    d = config.data
    sampler = TaskSampler(
        _sources(config, paths),
        shots=d.shots,
        query_size=d.query_size,
        seed=config.training_seed,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        augment=d.augment,
        shift=config.meta.task_shift,
    )
    model = build_baseline(method, resolution=d.resolution, seed=config.training_seed)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.jsonl"
    log.unlink(missing_ok=True)
    for step in tqdm(range(study.baseline_steps), desc=method, disable=quiet):
        t0 = time.perf_counter()
        loss = model.train_step(sampler.sample_batch(step, config.meta.meta_batch_size))
        record = {"step": step + 1, "loss": loss, "seconds": round(time.perf_counter() - t0, 3)}
        with open(log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)


def load_method(
    study: Study,
    method: str,
    runs: Path,
    device: torch.device,
    evaluation: dict[str, Any] | None = None,
):
    """The evaluation wrapper of a trained method (with ``evaluation``'s [eval] overrides)."""
    config = method_config(study, method, runs, evaluation)
    if method in BASELINES:
        model = build_baseline(
            method, resolution=config.data.resolution, seed=config.training_seed
        )
        model.load_state_dict(load_file(str(runs / method / "weights.safetensors")))
        return TestTimeAugmented(model) if config.eval.tta else model
    unadapted, lam = None, None
    if method == "scratch":
        theta = init_theta(config, device)
    else:
        ckpt = load_checkpoint(runs / method)
        trained, lam = ckpt.theta, ckpt.lam
        theta = {k: v.to(device) for k, v in blend_with_start(trained, config).items()}
        if config.eval.blend_only_unadapted:
            theta, unadapted = {k: v.to(device) for k, v in trained.items()}, theta
    model = build_model(config.model).to(device)
    return AdaptedModel.from_config(method, model, theta, config, device, unadapted, lam)


def evaluate_unit(
    study: Study, method: str, target: SegArrays, runs: Path, results: Path, quiet: bool
) -> Path:
    """Score one trained method on the target; its JSON is the unit's product."""
    path = results / f"{method}.json"
    if path.exists():
        return path
    # Shot counts that share test-time settings are scored together; each draw's support set
    # depends only on (seed, shots, draw), so grouping changes no draw.
    choice = tuned_choice(results, method)
    groups: dict[str, list[int]] = {}
    for k in study.config.eval.shots:
        key = json.dumps(settings_at(choice, k), sort_keys=True)
        groups.setdefault(key, []).append(k)
    t0 = time.perf_counter()
    records, evals, overlay = [], {}, None
    for key, shots in groups.items():
        chosen = {**json.loads(key), "shots": shots}
        config = method_config(study, method, runs, chosen)
        wrapper = load_method(study, method, runs, device_default(), chosen)
        records += evaluate([wrapper], target, config.data, config.eval, seed=config.seed,
                            quiet=quiet)
        evals.update({str(k): to_dict(config)["eval"] for k in shots})
        if overlay is None or _overlay_shots(study) in shots:
            overlay = wrapper
    payload = {
        "study": study.name,
        "method": method,
        "target": target.name,
        "sources": list(config.sources),
        "draws": study.draw_settings(),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "records": records,
    }
    if len(groups) == 1:
        payload["eval"] = to_dict(config)["eval"]
    else:  # settings chosen per shot count
        payload["eval_per_shot"] = evals
    _train_log = runs / method / "log.jsonl"
    if _train_log.exists():
        payload["train_log"] = [json.loads(x) for x in _train_log.read_text().splitlines() if x]
    results.mkdir(parents=True, exist_ok=True)
    _save_overlay_predictions(study, target, overlay, results / f"{method}{PREDICTIONS}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    tmp.replace(path)
    return path


TUNE_QUERY = 10
"""Query pairs of each source validation task used to choose test-time settings."""
TUNED = ".tune.json"
"""Suffix of a unit's choice of test-time settings (``results/<split>/<method>.tune.json``)."""
_ADAPTATION_ONLY = {"optimizer", "inner_lr", "inner_steps", "augment_support", "proximal"}


def tuned_choice(results: Path, method: str) -> dict[str, Any]:
    """What :func:`tune_unit` chose for ``method``: its ``[eval]`` overrides, or
    ``{"per_shot": {"<shots>": overrides, ...}}`` when chosen per shot count ({} if not tuned)."""
    path = results / f"{method}{TUNED}"
    if not path.exists():
        return {}
    payload = json.loads(path.read_text())
    if "chosen_per_shot" in payload:
        return {"per_shot": payload["chosen_per_shot"]}
    return payload["chosen"]


def settings_at(choice: dict[str, Any], shots: int) -> dict[str, Any]:
    """The ``[eval]`` overrides of a :func:`tuned_choice` at ``shots`` support pairs."""
    return choice["per_shot"].get(str(shots), {}) if "per_shot" in choice else choice


def tuned_settings(results: Path, method: str, shots: int) -> dict[str, Any]:
    """The ``[eval]`` overrides chosen for ``method`` at ``shots`` support pairs ({} if none)."""
    return settings_at(tuned_choice(results, method), shots)


def validation_tasks(
    config: RunConfig, paths: Paths, count: int, shots: int | None = None
) -> list[Task]:
    """``count`` tasks from the sources' test pools (never seen in training, never the
    target): ``shots`` (default ``data.shots``) support and ``TUNE_QUERY`` query pairs, not
    augmented, seeded apart from the meta-trainer's own validation tasks."""
    d = config.data
    sampler = TaskSampler(
        _sources(config, paths),
        shots=shots or d.shots,
        query_size=TUNE_QUERY,
        seed=config.seed + 2,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        augment=False,
        pool="test",
    )
    return [sampler.sample(0, i) for i in range(count)]


def tune_unit(
    study: Study, method: str, paths: Paths, runs: Path, results: Path, quiet: bool
) -> dict[str, Any]:
    """Choose ``method``'s test-time settings from ``study.tune_stages`` by mean Dice on source
    validation tasks (per shot count if ``study.tune_per_shot``); the target is never looked at.
    Returns :func:`tuned_choice` and writes every candidate's score to
    ``results/<split>/<method>.tune.json``."""
    path = results / f"{method}{TUNED}"
    if not study.tune_stages or path.exists():
        return tuned_choice(results, method)
    t0 = time.perf_counter()
    config = method_config(study, method, runs)
    payload: dict[str, Any] = {
        "study": study.name,
        "method": method,
        "selected_on": [Path(s).name for s in config.sources],
        "tasks": study.tune_tasks,
        "query_size": TUNE_QUERY,
    }
    if study.tune_per_shot:
        payload["chosen_per_shot"], payload["candidates_per_shot"] = {}, {}
        for k in config.eval.shots:
            tasks = validation_tasks(config, paths, study.tune_tasks, shots=k)
            chosen, candidates = _choose(study, method, runs, tasks, quiet)
            payload["chosen_per_shot"][str(k)] = chosen
            payload["candidates_per_shot"][str(k)] = candidates
    else:
        tasks = validation_tasks(config, paths, study.tune_tasks)
        payload["shots"] = config.data.shots
        payload["chosen"], payload["candidates"] = _choose(study, method, runs, tasks, quiet)
    payload["seconds"] = round(time.perf_counter() - t0, 1)
    payload["machine"] = machine()
    results.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return tuned_choice(results, method)


def _choose(
    study: Study, method: str, runs: Path, tasks: list[Task], quiet: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy over ``study.tune_stages``: each stage keeps its best candidate by mean Dice on
    ``tasks``.  Returns the chosen overrides and every candidate scored."""
    device = device_default()
    scores: dict[str, float] = {}
    chosen: dict[str, Any] = {}
    for stage in study.tune_stages:
        best, best_score = chosen, -np.inf
        for candidate in stage:
            if method in BASELINES and set(candidate) & _ADAPTATION_ONLY:
                continue  # the baselines do not adapt: only test-time augmentation applies
            if method != "imaml_warm" and candidate.get("start_blend"):
                continue  # no warm start to blend with
            trial = {**chosen, **candidate}
            key = json.dumps(trial, sort_keys=True)
            if key not in scores:
                wrapper = load_method(study, method, runs, device, trial)
                per_task = [
                    float(dice((wrapper.predict(t.support_x, t.support_y, t.query_x) > 0).float(),
                               t.query_y).mean())
                    for t in tqdm(tasks, desc=f"tune {method} {key}", disable=quiet)
                ]
                scores[key] = float(np.mean(per_task))
            if scores[key] > best_score:
                best, best_score = trial, scores[key]
        chosen = best
    return chosen, [{"eval": json.loads(k), "dice": v} for k, v in scores.items()]


PREDICTIONS = ".overlay.npz"
"""Suffix of a unit's saved test-pool predictions for the overlay figure (``results/<split>/``)."""


def _overlay_shots(study: Study) -> int:
    """Shots of the overlay figure's support set: 5 if evaluated, else the first shot count."""
    return 5 if 5 in study.config.eval.shots else study.config.eval.shots[0]


def _overlay_inputs(study: Study, target: SegArrays) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The overlay figure's support set (``_overlay_shots``, draw 0) and test pool."""
    config = study.config
    d = config.data
    k = _overlay_shots(study)
    support_x, support_y = draw_support(
        target, k, 0, seed=config.seed, test_fraction=d.test_fraction, split_seed=d.split_seed
    )
    test_x, test_y = test_pool(
        target,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        size=config.eval.test_size,
        seed=config.seed,
    )
    return support_x, support_y, test_x, test_y


def _save_overlay_predictions(study: Study, target: SegArrays, wrapper, path: Path) -> None:
    """Save one unit's binary test-pool predictions (bit-packed, a few kB) for the overlay
    figure, so that the figure needs no trained weights: units may run on different machines
    and ``runs/`` is not committed."""
    support_x, support_y, test_x, _ = _overlay_inputs(study, target)
    pred = (wrapper.predict(support_x, support_y, test_x) > 0).detach().cpu().numpy()
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, bits=np.packbits(pred.reshape(-1)), shape=np.array(pred.shape))
    tmp.replace(path)


def _load_overlay_predictions(path: Path) -> Tensor:
    with np.load(path) as data:
        shape = tuple(int(n) for n in data["shape"])
        bits = np.unpackbits(data["bits"])[: int(np.prod(shape))]
    return torch.from_numpy(bits.reshape(shape).astype(np.float32))


IMAML_VARIANTS = (REFERENCE, "imaml_warm")


def reference(methods: tuple[str, ...] | list[str]) -> str:
    """The method the overlay figure ranks images by: iMAML, else its warm-started variant."""
    return REFERENCE if REFERENCE in methods else "imaml_warm"


def tested_against(methods: tuple[str, ...] | list[str]) -> list[str]:
    """The iMAML variants of a study: every other method is tested against each of them."""
    return [m for m in IMAML_VARIANTS if m in methods]


def check_unit(study: Study, path: Path, payload: dict[str, Any]) -> None:
    """Refuse a finished unit scored on other draws or test images than ``study`` now says
    (its file was made before the study file changed): reporting it would mix experiments."""
    settings = study.draw_settings()
    # units finished before the draw settings were recorded carry only their target's name
    made = payload.get("draws") or {"target": payload["target"]}
    differ = sorted(k for k in made if made[k] != settings.get(k))
    if differ:
        raise ConfigError(
            f"{path}: scored with "
            + ", ".join(f"{k} = {made[k]}" for k in differ)
            + f", but study {study.name} now says "
            + ", ".join(f"{k} = {settings.get(k)}" for k in differ)
            + "; move the file away to score it again, or give the changed study a new name"
        )


def wilcoxon_tests(
    records: list[dict],
    methods: tuple[str, ...] | list[str],
    test: Callable[[list[dict], str, str, int], float | None],
) -> dict[str, float]:
    """``test(records, ref, other, shots)`` (:func:`paired_wilcoxon` over draws or
    :func:`paired_wilcoxon_images` over test images) of each reference method against each
    other method at each shot count, keyed ``"<ref>_vs_<other>@<shots>"``; untestable pairs are
    left out."""
    tests = {}
    shots = sorted({r["shots"] for r in records})
    for ref in tested_against(methods):
        for other in methods:
            if other != ref:
                for k in shots:
                    p = test(records, ref, other, k)
                    if p is not None:
                        tests[f"{ref}_vs_{other}@{k}"] = p
    return tests


def report(
    study: Study, target: SegArrays | None, runs: Path, results: Path, *, figures: bool = True
) -> dict[str, Any]:
    """Aggregate the per-method results into ``results/<name>.json`` (and figures; the overlay
    grid only with the ``target`` arrays)."""
    records, machines, train_logs, tuned = [], {}, {}, {}
    target_name = target.name if target is not None else None
    for method in study.methods:
        path = results / f"{method}.json"
        if (results / f"{method}{TUNED}").exists():
            tuned[method] = tuned_choice(results, method)
        if path.exists():
            payload = json.loads(path.read_text())
            check_unit(study, path, payload)
            target_name = target_name or payload["target"]
            records += payload["records"]
            machines[method] = payload["machine"]
            if payload.get("train_log"):
                train_logs[method] = payload["train_log"]
    summary = {f"{m}@{k}": s for (m, k), s in summarise(records).items()}
    iou = {f"{m}@{k}": s for (m, k), s in summarise(records, "iou").items()}
    tests = wilcoxon_tests(records, study.methods, paired_wilcoxon)
    image_tests = wilcoxon_tests(records, study.methods, paired_wilcoxon_images)
    steps_chosen: dict[str, dict[str, int]] = {}
    for r in records:
        if "inner_steps" in r:
            counts = steps_chosen.setdefault(f"{r['method']}@{r['shots']}", {})
            counts[str(r["inner_steps"])] = counts.get(str(r["inner_steps"]), 0) + 1
    out = {
        "study": study.name,
        "target": target_name or study.config.target,
        "sources": list(study.config.sources),
        "resolution": study.config.data.resolution,
        "seed": study.config.seed,
        "train_seed": study.config.training_seed,
        "methods": list(study.methods),
        "summary_dice": summary,
        "summary_iou": iou,
        "wilcoxon_p": tests,
        "wilcoxon_p_images": image_tests,
        "tuned": tuned,
        "steps_chosen": steps_chosen,
        "support_cv_rule": study.config.eval.support_cv_rule,
        "machines": machines,
        "records": records,
    }
    (results.parent / f"{study.name}.json").write_text(json.dumps(out) + "\n")
    curves = {}
    for key, s in summary.items():
        method, k = key.rsplit("@", 1)
        curves.setdefault(method, {})[int(k)] = (s["mean"], s["ci_low"], s["ci_high"])
    if curves and figures:
        dice_vs_shots(curves, results / "dice_vs_shots.png", f"{study.name}: {out['target']}")
        learning_curves(train_logs, results / "learning_curves.png")
        if target is not None:
            _overlays(study, target, runs, results / "overlays.png")
    return out


def _overlays(study: Study, target: SegArrays, runs: Path, png: Path) -> None:
    """Each finished method's predictions after adapting on draw 0, best and worst images.

    Predictions come from the unit's saved file; a unit evaluated before those files existed
    is predicted again only when its trained weights are here and it was evaluated on this kind
    of machine (so that the figure shows the model the table scores); otherwise it is left out,
    with a warning."""
    _, _, test_x, test_y = _overlay_inputs(study, target)
    rows, missing = [], []
    for method in study.methods:
        result = png.parent / f"{method}.json"
        if not result.exists():
            continue
        saved = png.parent / f"{method}{PREDICTIONS}"
        if not saved.exists():
            evaluated_on = json.loads(result.read_text()).get("machine", {})
            same_kind = {k: evaluated_on.get(k) for k in ("platform", "device")} == {
                k: machine()[k] for k in ("platform", "device")
            }
            if not (same_kind and _has_weights(method, runs)):
                missing.append(method)
                continue
            chosen = tuned_settings(png.parent, method, _overlay_shots(study))
            wrapper = load_method(study, method, runs, device_default(), chosen)
            _save_overlay_predictions(study, target, wrapper, saved)
        rows.append((method, _load_overlay_predictions(saved)))
    if missing:
        warnings.warn(
            f"{png}: left out {', '.join(missing)} (trained elsewhere, no saved predictions)",
            stacklevel=2,
        )
    if not rows:
        return
    ref = dict(rows).get(REFERENCE, rows[0][1])  # rank test images by iMAML's Dice
    ranked = torch.argsort(dice(ref, test_y), descending=True).tolist()
    order = ranked[:3] + ranked[-3:]  # three good cases, three failures
    grid = [
        (
            m,
            test_x[order].numpy(),
            p[order, 0].numpy().astype(bool),
            test_y[order, 0].numpy().astype(bool),
        )
        for m, p in rows
    ]
    overlay_grid(grid, png, col_titles=["best"] * 3 + ["worst"] * 3)


def _has_weights(method: str, runs: Path) -> bool:
    if method == "scratch":
        return True
    folder = runs / method
    return (folder / "weights.safetensors").exists() or (folder / "checkpoint.safetensors").exists()


def study_dirs(spec: Path, paths: Paths) -> tuple[Study, Path, Path]:
    """The study, its results folder (``results/<name>``) and its runs folder (``runs/<name>``),
    both beside the spec's ``experiments/`` folder unless ``paths.out_dir`` names the results'."""
    study = Study.from_file(spec)
    root = Path(spec).resolve().parent.parent
    results = (paths.out_dir if paths.out_dir != Path(".") else root / "results") / study.name
    return study, results, root / "runs" / (study.train_from or study.name)


def run_experiment(
    spec: Path,
    paths: Paths,
    *,
    quiet: bool = False,
    only: list[str] | None = None,
    figures: bool = True,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run every unit of the study that has not run yet, then write the report.

    A unit whose result file exists is finished, wherever it ran: it is neither trained, tuned
    nor scored again (its weights need not be here).  ``report_only`` runs no unit and rebuilds
    the report from the finished ones.  ``figures=False`` skips the overlay grid and plots."""
    study, results, runs = study_dirs(spec, paths)
    if report_only and not any((results / f"{m}.json").exists() for m in study.methods):
        raise ConfigError(f"{results}: no finished unit yet; run the study first")
    try:
        target = load_arrays(
            study.config.target,
            study.config.data.resolution,
            data_root=paths.data_root,
            cache_dir=paths.cache_dir,
        )
    except DataError as err:
        if not report_only:
            raise
        warnings.warn(f"overlay figure not rebuilt (no target images): {err}", stacklevel=2)
        target = None
    trainer = study.trained_by(Path(spec).parent)
    for method in [] if report_only else only or study.methods:
        if method not in study.methods:
            raise ConfigError(f"{spec}: method {method} is not in this study")
        finished = results / f"{method}.json"
        if finished.exists():
            check_unit(study, finished, json.loads(finished.read_text()))
            continue
        train_unit(trainer, method, paths, runs, quiet)
        tune_unit(study, method, paths, runs, results, quiet)
        evaluate_unit(study, method, target, runs, results, quiet)
    return report(study, target, runs, results, figures=figures)


def describe_settings(chosen: dict[str, Any]) -> str:
    """Test-time ``[eval]`` overrides in a few words (``{}``: the preset's own); a per-shot
    choice (:func:`tuned_choice`) reads ``1-shot: ...; 5-shot: ...``."""
    if "per_shot" in chosen:
        return "; ".join(
            f"{k}-shot: {describe_settings(c)}"
            for k, c in sorted(chosen["per_shot"].items(), key=lambda kc: int(kc[0]))
        )
    words = {
        "inner_steps": lambda v: f"{v} steps",
        "optimizer": lambda v: {"sgd": "SGD", "adam": "Adam"}.get(v, v),
        "inner_lr": lambda v: f"lr {v:g}",
        "augment_support": lambda v: "support aug" if v else "",
        "tta": lambda v: "TTA" if v else "",
        "support_cv": lambda v: "steps by support CV" if v else "",
        "support_cv_rule": lambda v: SUPPORT_CV_RULE_WORDS[v][0],
        "proximal": lambda v: "proximal" if v else "",
    }
    parts = [words[k](v) if k in words else f"{k}={v}" for k, v in chosen.items()]
    return ", ".join(p for p in parts if p) or "preset"


def describe_steps_chosen(steps_chosen: dict[str, dict[str, int]], rule: str = "best") -> str:
    """One sentence on the adaptation steps support cross-validation chose (``[eval]
    support_cv``, by ``rule``): per shot count that could be split (k >= 2) and method,
    ``steps (draws)``."""
    by_shots: dict[int, list[str]] = {}
    for key, counts in steps_chosen.items():
        method, k = key.rsplit("@", 1)
        if int(k) >= 2:
            parts = ", ".join(f"{n} ({counts[n]})" for n in sorted(counts, key=int))
            by_shots.setdefault(int(k), []).append(f"{method} {parts}")
    if not by_shots:
        return ""
    shots = "; ".join(f"{k}-shot: {'; '.join(v)}" for k, v in sorted(by_shots.items()))
    name = SUPPORT_CV_RULE_WORDS[rule][1]
    how = f" ({name})" if name else ""
    return (
        f"Adaptation steps chosen per support set by cross-validation on its shots{how}, steps "
        f"(draws): {shots}; 1 shot cannot be split and takes the most steps."
    )


def markdown_table(result: dict[str, Any]) -> str:
    """The study's Dice table (mean and 95 % CI per shot count), from ``results/<name>.json``."""
    summary, tests = result["summary_dice"], result["wilcoxon_p"]
    # Reports written before the test over images existed hold only the one over draws.
    image_tests = result.get("wilcoxon_p_images")
    if image_tests is None:
        image_tests = wilcoxon_tests(result["records"], result["methods"], paired_wilcoxon_images)
    tuned = result.get("tuned") or {}
    shots = sorted({int(key.rsplit("@", 1)[1]) for key in summary})
    done = [m for m in result["methods"] if any(k.startswith(f"{m}@") for k in summary)]
    head = "| method | " + ("test-time settings | " if tuned else "")
    head += " | ".join(f"Dice {k}-shot [95% CI]" for k in shots)
    refs = tested_against(result["methods"])
    mid = shots[len(shots) // 2]
    head += f" | IoU {mid}-shot"
    head += "".join(f" | Wilcoxon p vs {ref} ({mid}-shot): draws / images" for ref in refs)
    head += " |\n" + "|---" * (len(shots) + 2 + len(refs) + bool(tuned)) + "|\n"
    rows = []
    for method in done:
        cells = [describe_settings(tuned.get(method, {}))] if tuned else []
        for k in shots:
            s = summary.get(f"{method}@{k}")
            cells.append(f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s else "-")
        iou = result["summary_iou"].get(f"{method}@{mid}")
        cells.append(f"{iou['mean']:.3f}")
        for ref in refs:
            key = f"{ref}_vs_{method}@{mid}"
            p, pi = (t.get(key) for t in (tests, image_tests))
            cells.append("-" if p is None and pi is None else format_p_pair(p, pi))
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    missing = [m for m in result["methods"] if m not in done]
    by_device: dict[str, list[str]] = {}
    for method, m in result["machines"].items():
        threads = m["cpu_threads"]
        name = (
            m["device"]
            if m["device"] != "cpu"
            else f"a CPU ({threads} torch thread{'s' if threads != 1 else ''})"
        )
        by_device.setdefault(name, []).append(method)
    devices = sorted(by_device)
    if len(devices) > 1:
        devices = ["; ".join(f"{d}: {', '.join(by_device[d])}" for d in devices)]
    draws = max(s["draws"] for s in summary.values())
    sources = [re.sub(r"-\d+px-[0-9a-f]+\.npz$", "", Path(s).name) for s in result["sources"]]
    note = (
        f"\nTarget {result['target']} "
        + ("(test pool; a training dataset)" if result["target"] in sources else "(unseen)")
        + f", sources {', '.join(sources)}, "
        f"{result['resolution']} px, {draws} support draws per shot count (the same for every "
        f"method); measured on {', '.join(devices)}."
    )
    if refs:
        note += (
            " Wilcoxon p: paired, over the support draws / over the test images (each image's "
            "Dice averaged over the draws)."
        )
    seed = result.get("seed", 0)
    if result.get("train_seed", seed) != seed:
        note += f" Trained with training seed {result['train_seed']} (draws of seed {seed})."
    if tuned:
        note += (
            " Test-time settings chosen per method by mean Dice on validation tasks of the "
            "sources (their test pools), never on the target; `preset` is the inner loop of "
            "meta-training."
        )
    fixed = [m for m in done if (s := summary.get(f"{m}@{mid}")) and s["ci_low"] == s["ci_high"]]
    if fixed:
        note += (
            f" {', '.join(fixed)} score{'s' if len(fixed) == 1 else ''} the same on every "
            f"{mid}-shot draw (no fine-tuning: the support set is not used): the interval over "
            "draws has zero width and leaves out the test pool's sampling error, and two such "
            "rows get no p-value over draws."
        )
    if result.get("steps_chosen"):
        rule = result.get("support_cv_rule", "best")
        note += " " + describe_steps_chosen(result["steps_chosen"], rule)
    if missing:
        note += f" Not run yet: {', '.join(missing)}."
    return head + "\n".join(rows) + "\n" + note + "\n"


def update_readme(readme: Path, name: str, table: str) -> bool:
    """Replace the text between ``<!-- STUDY:name -->`` and ``<!-- /STUDY:name -->``."""
    begin, end = f"<!-- STUDY:{name} -->", f"<!-- /STUDY:{name} -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}{end}{tail}")
    return True
