"""The meta-training loop: seeded, logged, checkpointed, resumable, distributed-aware.

``train(config, paths)`` learns the initialisation ``theta`` from the source datasets:

* ``imaml | maml | fomaml | reptile``: meta-steps over meta-batches of tasks, each task's
  meta-gradient from :func:`imaml_seg.meta.algorithms.meta_gradient`, averaged over the tasks that
  came back finite, then one outer Adam step (plain SGD interpolation for Reptile);
* ``transfer``: supervised training on the pooled source images (fine-tuned later by ``adapt()``);
* ``scratch``: no training; the seeded random initialisation.

Every ``checkpoint_every`` steps the run is saved atomically; ``resume=True`` continues from the
last checkpoint and reaches the same ``theta`` as an uninterrupted run, because tasks depend on
``(seed, step, index)`` alone and the optimiser state is saved with the weights.  For the same
reason a finished run can be continued to a larger step budget (``meta_steps`` or
``pretrain_steps``, nothing else training reads changed; see :func:`extends`): 600 steps and
then 600 more reach the weights of one 1200-step run.

With ``meta.average_from = s`` a meta-learner's checkpoint ships the mean of ``theta`` over
meta-steps ``s`` to the last (``meta.pretrain_average_from``: transfer's pretraining steps); the
running mean (``opt/average``) travels in the optimiser state, and once the run is finished the
last step's own ``theta`` does (``opt/raw``), so resuming and extending continue both.

With ``meta.lam_lr > 0`` iMAML also learns one proximal strength per weight tensor (outer Adam
on ``log lam``, state ``opt/lam_m``, ``opt/lam_v``); the checkpoint carries the strengths.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from imaml_seg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from imaml_seg.config import RunConfig, to_dict
from imaml_seg.data.cache import load_arrays
from imaml_seg.data.tasks import TaskSampler, pooled_batch
from imaml_seg.meta.algorithms import meta_gradient, supervised_grad
from imaml_seg.meta.distributed import World, all_reduce_sum
from imaml_seg.meta.inner import adapt
from imaml_seg.metrics import dice
from imaml_seg.model import Params, build_model, forward, get_params

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"


class RunExistsError(RuntimeError):
    """The output folder already holds a run and neither resume nor overwrite was asked."""


@dataclass(frozen=True)
class Paths:
    """Where a run reads data and writes its outputs."""

    out_dir: Path
    data_root: Path | None = None
    cache_dir: Path | None = None


def extends(old: RunConfig, new: RunConfig) -> bool:
    """Whether ``new`` is ``old`` with a step budget (:func:`run_steps`) at least as large and
    nothing else that training reads changed, so that a run of ``old`` can be continued to it.
    The ``[eval]`` section and the budget the run does not train with (``meta_steps`` of
    transfer, ``pretrain_steps`` of the others) may differ: training never reads them
    (validation adapts with the ``[inner]`` loop).  Nor does transfer read ``start_weight``, a
    term of the meta-objective, ``average_from``, the learned strengths' ``lam_lr`` and
    ``lam_max`` or ``task_shift``, so a warm-start study with any of them may continue plain
    transfer; the meta-learners do not read ``pretrain_average_from`` or ``pretrain_shift``.  A
    run without averaging may be continued to one that averages only steps after its own
    (classic SWA: train, then average further steps)."""
    budget = {"meta_steps": new.meta.meta_steps, "pretrain_steps": new.meta.pretrain_steps}
    if old.meta.algorithm in ("transfer", "scratch"):
        budget["start_weight"] = new.meta.start_weight
        budget["average_from"] = new.meta.average_from
        budget["lam_lr"], budget["lam_max"] = new.meta.lam_lr, new.meta.lam_max
        budget["task_shift"] = new.meta.task_shift
    if old.meta.algorithm != "transfer":
        budget["pretrain_average_from"] = new.meta.pretrain_average_from
        budget["pretrain_shift"] = new.meta.pretrain_shift
    own = "pretrain_average_from" if old.meta.algorithm == "transfer" else "average_from"
    if average_start(old) == 0 and getattr(new.meta, own) > run_steps(old):
        budget[own] = getattr(new.meta, own)  # averaging only steps the old run lacks
    return (
        replace(old, meta=replace(old.meta, **budget), eval=new.eval) == new
        and run_steps(new) >= run_steps(old)
    )


def run_steps(config: RunConfig) -> int:
    """The steps a run of ``config`` trains: ``pretrain_steps`` for transfer, none for
    scratch, ``meta_steps`` for the meta-learners."""
    return {"transfer": config.meta.pretrain_steps, "scratch": 0}.get(
        config.meta.algorithm, config.meta.meta_steps
    )


def average_start(config: RunConfig) -> int:
    """The step (1-based) from which a run ships the mean of its weights, 0 for none:
    ``pretrain_average_from`` for transfer, ``average_from`` for the meta-learners."""
    return {"transfer": config.meta.pretrain_average_from, "scratch": 0}.get(
        config.meta.algorithm, config.meta.average_from
    )


def write_config(out: Path, config: RunConfig) -> None:
    """``out/config.json``: the run's config, readable without loading the checkpoint."""
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")


def device_default() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_theta(config: RunConfig, device: torch.device) -> Params:
    """The seeded random initialisation (or the warm start's weights)."""
    torch.manual_seed(config.training_seed)
    theta = get_params(build_model(config.model))
    if config.meta.warm_start:
        warm = load_checkpoint(config.meta.warm_start)
        if warm.config.model != config.model:
            raise ValueError(
                f"{config.meta.warm_start}: warm start has model {warm.config.model}, "
                f"the run asks for {config.model}"
            )
        theta = warm.theta
    return {k: v.to(device) for k, v in theta.items()}


@dataclass
class OuterAdam:
    """Adam on weight dicts, its state a plain dict of dicts so it checkpoints as tensors."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, theta: Params) -> dict[str, Params]:
        return {
            "m": {k: torch.zeros_like(v) for k, v in theta.items()},
            "v": {k: torch.zeros_like(v) for k, v in theta.items()},
        }

    def step(self, theta: Params, grad: Params, state: dict[str, Params], t: int) -> Params:
        """Apply update number ``t`` (1-based) in place of ``state``; return the new theta."""
        b1, b2 = self.betas
        out = {}
        for k in theta:
            state["m"][k].mul_(b1).add_(grad[k], alpha=1 - b1)
            state["v"][k].mul_(b2).addcmul_(grad[k], grad[k], value=1 - b2)
            m_hat = state["m"][k] / (1 - b1**t)
            v_hat = state["v"][k] / (1 - b2**t)
            out[k] = theta[k] - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return out


def clip_grad_norm(grad: Params, max_norm: float | None) -> tuple[Params, float]:
    """``grad`` scaled down to a global L2 norm of at most ``max_norm`` (unchanged when it is
    within it or ``max_norm`` is None), and its norm before scaling."""
    norm = float(torch.nn.utils.get_total_norm(list(grad.values())))  # one device sync
    if max_norm is None or norm <= max_norm:
        return grad, norm
    scale = max_norm / norm
    return {k: v * scale for k, v in grad.items()}, norm


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed from."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def validation_dice(
    model: torch.nn.Module,
    theta: Params,
    sampler: TaskSampler,
    config: RunConfig,
    n: int,
    device: torch.device,
    lam: Params | None = None,
) -> float:
    """Mean query Dice after ``adapt()`` on ``n`` tasks from the sources' test pools (iMAML's
    proximal term with ``lam``, per-tensor strengths, when given)."""
    scores = []
    for index in range(n):
        task = sampler.sample(0, index)
        phi = adapt(
            model,
            theta,
            task.support_x.to(device),
            task.support_y.to(device),
            config.inner,
            proximal=config.meta.algorithm == "imaml",
            lam=lam or None,
        ).params
        with torch.no_grad():
            pred = torch.sigmoid(forward(model, phi, task.query_x.to(device))) > 0.5
        scores.append(dice(pred.float().cpu(), task.query_y).mean().item())
    return sum(scores) / len(scores)


def train(
    config: RunConfig,
    paths: Paths,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    world: World | None = None,
    device: torch.device | None = None,
    stop_after: int | None = None,
) -> Path:
    """Meta-train (or pretrain) ``theta`` on ``config.sources``; return the checkpoint path.

    ``stop_after`` ends the run early after that many steps of this call (for tests and
    time-boxed units); the checkpoint then holds the step reached and ``--resume`` continues.
    """
    world = world or World()
    device = device or device_default()
    out = paths.out_dir
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    if ckpt_path.exists() and not resume and not overwrite:
        raise RunExistsError(
            f"{out}: holds a run already; pass --resume to continue it or --overwrite to replace it"
        )
    algorithm = config.meta.algorithm
    model = build_model(config.model).to(device)
    start, opt_state, state = 0, None, {}
    lam: Params = {}
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        start, state = ckpt.step, ckpt.state
        if ckpt.config != config:
            if extends(ckpt.config, config):
                state = {k: v for k, v in state.items() if k != "done"}
                if world.is_main:
                    write_config(out, config)
            else:
                warnings.warn(
                    f"{ckpt_path}: resuming with the checkpoint's own config", stacklevel=2
                )
                config = ckpt.config
        opt_state = {
            s: {k: v.to(device) for k, v in p.items()} for s, p in ckpt.optimizer_state.items()
        }
        theta = {k: v.to(device) for k, v in ckpt.theta.items()}
        lam = {k: v.to(device) for k, v in ckpt.lam.items()}
        if "raw" in opt_state:  # a finished averaged run: theta is the mean, raw the last step's
            opt_state["average"], theta = theta, opt_state.pop("raw")
        if world.is_main:
            _truncate_log(log_path, start)
    else:
        theta = init_theta(config, device)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log_path.unlink(missing_ok=True)
            write_config(out, config)

    total = run_steps(config)
    if state.get("done") or start >= total:
        if world.is_main and not ckpt_path.exists():
            save_checkpoint(ckpt_path, Checkpoint(config, theta, start, {}, {"done": True}))
        return ckpt_path

    d = config.data
    sources = [
        load_arrays(s, d.resolution, data_root=paths.data_root, cache_dir=paths.cache_dir)
        for s in config.sources
    ]
    common = dict(seed=config.training_seed, test_fraction=d.test_fraction, split_seed=d.split_seed)
    sampler = TaskSampler(
        sources,
        shots=d.shots,
        query_size=d.query_size,
        augment=d.augment,
        shift=config.meta.task_shift,
        **common,
    )
    val_sampler = TaskSampler(
        sources,
        shots=d.shots,
        query_size=d.query_size,
        augment=False,
        pool="test",
        **{**common, "seed": config.training_seed + 1},
    )
    adam = OuterAdam(config.meta.meta_lr)
    if opt_state is None:
        opt_state = adam.init(theta) if algorithm != "reptile" else {}
    lam_adam = OuterAdam(config.meta.lam_lr)
    if config.meta.lam_lr > 0 and algorithm == "imaml" and not lam:
        lam = {k: torch.full((), config.inner.lam).to(v) for k, v in theta.items()}
        opt_state.update({f"lam_{slot}": p for slot, p in lam_adam.init(lam).items()})
    log_bounds = (math.log(config.meta.lam_max / 1e4), math.log(config.meta.lam_max))

    step_fn: Callable[[int], tuple[Params | None, Params | None, dict[str, Any]]]
    if algorithm == "transfer":

        def step_fn(step: int) -> tuple[Params | None, Params | None, dict[str, Any]]:
            x, y = pooled_batch(
                sources,
                config.meta.pretrain_batch_size,
                step,
                augment=d.augment,
                shift=config.meta.pretrain_shift,
                **common,
            )
            grad, loss = supervised_grad(model, theta, x.to(device), y.to(device))
            return grad, None, {"loss": loss}
    else:

        def step_fn(step: int) -> tuple[Params | None, Params | None, dict[str, Any]]:
            return _meta_step(model, theta, sampler, config, step, world, device, lam or None)

    bar = tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc=f"{algorithm} {out.name}",
        disable=quiet or not world.is_main,
        unit="step",
    )
    average_from = average_start(config)
    done_here = 0
    for step in bar:
        t0 = time.perf_counter()
        grad, lam_grad, record = step_fn(step)
        if grad is not None:
            grad, record["grad_norm"] = clip_grad_norm(grad, config.meta.max_grad_norm)
            if algorithm == "reptile":
                theta = {k: theta[k] - config.meta.reptile_lr * grad[k] for k in theta}
            else:
                theta = adam.step(theta, grad, opt_state, step + 1)
        if lam_grad is not None:
            lam = learned_lam_step(lam, lam_grad, lam_adam, opt_state, step + 1, log_bounds)
        if lam:
            values = torch.stack(list(lam.values()))
            record.update(lam_lo=float(values.min()), lam_hi=float(values.max()))
        if average_from and step + 1 >= average_from:
            running_mean(opt_state, theta, step + 2 - average_from)
        record.update(step=step + 1, phase=algorithm, seconds=round(time.perf_counter() - t0, 3))
        last = step + 1 == total
        if (
            world.is_main
            and config.meta.val_every
            and ((step + 1) % config.meta.val_every == 0 or last)
        ):
            record["val_dice"] = validation_dice(
                model, theta, val_sampler, config, config.meta.val_tasks, device, lam
            )
            if last and "average" in opt_state:
                record["val_dice_average"] = validation_dice(
                    model,
                    opt_state["average"],
                    val_sampler,
                    config,
                    config.meta.val_tasks,
                    device,
                    lam,
                )
        if world.is_main:
            _log(log_path, record)
            bar.set_postfix(
                {k: v for k, v in record.items() if k in ("loss", "query_loss", "val_dice")}
            )
        done_here += 1
        stop = stop_after is not None and done_here >= stop_after
        if world.is_main and (last or stop or (step + 1) % config.meta.checkpoint_every == 0):
            weights, saved_state = theta, opt_state
            if last and "average" in opt_state:
                saved_state = {k: v for k, v in opt_state.items() if k != "average"}
                weights, saved_state["raw"] = opt_state["average"], theta
            save_checkpoint(
                ckpt_path,
                Checkpoint(config, weights, step + 1, saved_state, {"done": last}, lam),
            )
        if stop:
            break
    bar.close()
    if world.is_main:
        from imaml_seg.plots import learning_curve

        learning_curve(log_path, out / "learning_curve.png")
    return ckpt_path


def learned_lam_step(
    lam: Params,
    lam_grad: Params,
    adam: OuterAdam,
    opt_state: dict[str, Params],
    t: int,
    bounds: tuple[float, float],
) -> Params:
    """One outer Adam step on ``log lam`` (state ``opt_state['lam_m'|'lam_v']``), clipped to
    ``bounds`` (log scale); returns the new strengths."""
    state = {"m": opt_state["lam_m"], "v": opt_state["lam_v"]}
    logs = adam.step({k: v.log() for k, v in lam.items()}, lam_grad, state, t)
    return {k: v.clamp(*bounds).exp() for k, v in logs.items()}


def running_mean(opt_state: dict[str, Params], theta: Params, n: int) -> None:
    """Fold ``theta``, the ``n``-th weights averaged (1-based), into ``opt_state["average"]``,
    the mean of the ``n - 1`` before it, in place."""
    if n == 1:
        opt_state["average"] = {k: v.detach().clone() for k, v in theta.items()}
        return
    for k, v in opt_state["average"].items():
        v.add_(theta[k] - v, alpha=1.0 / n)


def _meta_step(
    model: torch.nn.Module,
    theta: Params,
    sampler: TaskSampler,
    config: RunConfig,
    step: int,
    world: World,
    device: torch.device,
    lam: Params | None = None,
) -> tuple[Params | None, Params | None, dict[str, Any]]:
    """Average this meta-batch's finite task meta-gradients over all ranks (and, with per-tensor
    strengths ``lam``, their ``log lam`` derivatives: the second value, else None)."""
    leaf = {k: v.detach().requires_grad_(config.meta.algorithm == "maml") for k, v in theta.items()}
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    lam_total = {k: torch.zeros_like(v) for k, v in (lam or {}).items()}
    # ok tasks, query loss, cg residual, skipped, start query loss
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for index in world.my_tasks(config.meta.meta_batch_size):
        task = sampler.sample(step, index)
        task = type(task)(
            *(t.to(device) for t in (task.support_x, task.support_y, task.query_x, task.query_y)),
            task.dataset,
        )
        result = meta_gradient(config.meta.algorithm, model, leaf, task, config, lam=lam)
        if not result.ok:
            warnings.warn(
                f"step {step + 1}: task {index} ({task.dataset}) skipped: {result.stats}",
                stacklevel=2,
            )
            sums[3] += 1
            continue
        for k in total:
            total[k] += result.grad[k].detach()
        for k in lam_total:
            lam_total[k] += result.lam_grad[k]
        sums[0] += 1
        sums[1] += result.query_loss
        sums[2] += float(result.stats.get("cg_residual", 0.0))
        sums[4] += float(result.stats.get("start_query_loss", 0.0))
    tensors = list(total.values()) + list(lam_total.values()) + [sums]
    all_reduce_sum(tensors, world)
    ok, skipped = int(sums[0].item()), int(sums[3].item())
    record: dict[str, Any] = {"tasks": ok, "skipped": skipped}
    if ok == 0:
        return None, None, record
    record["query_loss"] = sums[1].item() / ok
    if config.meta.algorithm == "imaml":
        record["cg_residual"] = sums[2].item() / ok
    if config.meta.start_weight > 0:
        record["start_query_loss"] = sums[4].item() / ok
    grad = {k: v / ok for k, v in total.items()}
    lam_grad = {k: v / ok for k, v in lam_total.items()} if lam else None
    found = [*grad.values(), *(lam_grad or {}).values()]
    if not all(torch.isfinite(v).all() for v in found) or not math.isfinite(record["query_loss"]):
        record["skipped"] += ok
        return None, None, record
    return grad, lam_grad, record


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
