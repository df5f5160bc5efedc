"""Cost of one meta-gradient: ours (torch.func) against torchopt and higher, in one run.

    .venv/bin/python bench/meta_gradient.py [--resolution 64] [--quick] [--threads 2]
        [--out bench/results/meta_gradient.json] [--device auto] [--ks ...] [--ms ...]

On one U-Net (``ModelConfig`` default widths unless ``--features``) and one task (5 support + 5
query synthetic images, ``TaskSampler`` on ``synthetic:0``), all in the same process:

1. primitives: ``t_grad`` (one support-loss gradient, ``torch.func.grad``), ``t_hvp`` (one exact
   Hessian-vector product as CG uses it: ``imaml_seg.meta.implicit.hvp_matvec`` built once, the
   build is ``t_hvp_setup``, then per product), ``t_ggn`` (the same for a Gauss-Newton product,
   ``ggn_matvec``; build ``t_ggn_setup``), and for reference a double-backward HVP on a kept
   autograd graph (the peers' way), a one-shot forward-over-reverse ``hvp`` and a forward pass;
2. one meta-gradient, at inner steps k and CG steps m, for
   ``ours-imaml-exact`` (``meta_gradient('imaml')``, ``implicit.hessian = 'exact'``),
   ``ours-imaml-ggn`` (the same with ``'ggn'``, our default), ``ours-maml`` (second order, per k),
   ``torchopt-imaml`` (``torchopt.diff.implicit.custom_root`` + ``torchopt.linear_solve.solve_cg``,
   inner loop with ``torchopt.sgd``) and ``higher-imaml`` (``higher.innerloop_ctx`` inner loop,
   double-backward HVPs on a kept graph, hand-written CG), the last two with the same math as
   ``ours-imaml-exact``: k proximal SGD steps from theta, then m CG steps on
   ``(I + (H + damping I)/lam) v = g`` from zero with the exact support-loss Hessian at phi.  Their
   meta-gradients are checked against ours (cosine > 0.99).  ``--damping`` (default 50, the same
   for every method) keeps that system positive definite: at this random initialisation the
   support Hessian has eigenvalues down to about -40 (power iteration, 64 px), while proximal SGD
   at lr 0.1 needs lam < 20, so without it CG meets negative curvature, ours stops early by design
   (fewer products, a different answer) and the peers run on with meaningless iterates: neither
   the work nor the result would be equal.  The inner step is 0.05 (``--inner-lr``), not the
   default 0.1: at 0.1 proximal SGD on this network is unstable along the top Hessian direction
   (about 51 at phi after 20 steps, so |1 - lr (51 + lam)| = 4.2 per step) and amplifies float32
   rounding differences: the same peer at 1 and at 2 threads gave meta-gradients with cosine 0.79
   at k = 20, while at 0.05 every pair agrees to 1.0000.  Neither damping nor the step size
   changes the cost of a step or a product;
3. the cost model ``ideal = (k + 1) t_grad + m t_curv`` (``t_curv`` = ``t_hvp``, or ``t_ggn`` for
   the GGN variant) and ``measured / ideal``;
4. peak memory of each configuration (method below) and its growth with k;
5. the ratios and goals, each printed MET or MISSED.

Timing: every configuration is called once untimed (warm-up; its meta-gradient is the one
compared), then ``--repeats`` timed calls, interleaved round-robin over all configurations of the
same k so that a change in machine load hits every method alike; the median is reported.  On CUDA
each call is bracketed by ``torch.cuda.synchronize``.

Peak memory, CPU: each configuration runs in a fresh child interpreter (``--quick``: one child
for all configurations, the same counter; one torch thread, see ``MEMORY_CHILD_THREADS``), which
builds the same model and task, calls the
configuration once to warm up, resets the kernel's peak resident-set counter (``VmHWM``, via
``/proc/self/clear_refs``), reads the resident set, calls it once more and reports
``VmHWM - VmRSS before``.  The child runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that
every tensor of 64 KiB or more is its own mapping, returned to the kernel when freed: the resident
set then follows the live tensors (plus the small heap), and the peak is the true high-water mark
of the call, scratch buffers of oneDNN/MKL included.  Why not the alternatives: ``ru_maxrss``
cannot be reset and so includes imports, setup and warm-up; ``torch.profiler(profile_memory)``
records allocations op by op and its peak must be reconstructed, with an overhead that distorts
the run; PyTorch has no CPU counterpart of ``max_memory_allocated``.  A fresh process per
configuration keeps one configuration's heap from hiding another's.  CUDA: in the main process,
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call, peak statistics
reset just before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from imaml_seg.config import (
    DataConfig,
    ImplicitConfig,
    InnerConfig,
    ModelConfig,
    RunConfig,
    merge,
)
from imaml_seg.data.synthetic import synthetic_arrays
from imaml_seg.data.tasks import Task, TaskSampler
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.algorithms import ggn_curvature, meta_gradient
from imaml_seg.meta.implicit import ggn_matvec, hvp, hvp_matvec
from imaml_seg.model import Params, build_model, flatten, forward, get_params, num_params, unflatten

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "meta_gradient.json"

FULL = {
    "resolution": 64,
    "features": (8, 16, 32, 64, 128, 8),
    "ks": (1, 5, 10, 20),
    "ms": (2, 5),
    "repeats": 5,
    "primitive_repeats": 15,
    "threads": 2,
    "damping": 50.0,
    "inner_lr": 0.05,
}
QUICK = {
    "resolution": 32,
    "features": (4, 4, 8, 8, 16, 4),
    "ks": (1, 2),
    "ms": (2,),
    "repeats": 1,
    "primitive_repeats": 1,
    "threads": 1,
    "damping": 50.0,
    "inner_lr": 0.05,
}

OURS_EXACT = "ours-imaml-exact"
OURS_GGN = "ours-imaml-ggn"
TORCHOPT = "torchopt-imaml"
HIGHER = "higher-imaml"
MAML = "ours-maml"
IMAML_METHODS = (OURS_EXACT, OURS_GGN, TORCHOPT, HIGHER)
PEER_MODULE = {TORCHOPT: "torchopt", HIGHER: "higher"}

MEMORY_CHILD_THREADS = 1
"""Torch threads in the memory children.  The peak does not depend on it (measured here: one
gradient 32.3 vs 32.5 MiB, one iMAML meta-gradient 81.6 vs 81.5 MiB at 1 vs 2 threads), while on
a 2-core machine shared with other jobs two OpenMP threads waiting for each other at every
operator made the children 10-40x slower (see ``_common.thread_check``)."""

GOAL_SPEEDUP = 1.5
GOAL_IDEAL = 1.2
GOAL_FLAT_MEMORY = 1.1
GOAL_COSINE = 0.99

Runner = Callable[[], tuple[Params, dict[str, Any]]]

# torchopt 0.7.3 calls functorch.vjp, deprecated since torch 2.0 (it still works in 2.13).
warnings.filterwarnings("ignore", message=r".*functorch\.vjp.*", category=FutureWarning)


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """The one network, initialisation and task every method is measured on."""

    model: nn.Module
    theta: Params
    task: Task
    config: RunConfig
    device: torch.device


def build_setup(
    resolution: int,
    features: tuple[int, ...],
    device: torch.device,
    damping: float,
    inner_lr: float,
) -> Setup:
    config = RunConfig(
        data=DataConfig(resolution=resolution),
        model=ModelConfig(features=tuple(features)),
        inner=InnerConfig(inner_lr=inner_lr),
        implicit=ImplicitConfig(damping=damping),
    )
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    theta = {k: v.to(device) for k, v in get_params(model).items()}
    arrays = synthetic_arrays(0, 32, resolution, config.seed)
    sampler = TaskSampler(
        [arrays], shots=5, query_size=5, seed=config.seed, test_fraction=0.5, split_seed=0,
        augment=False,
    )
    t = sampler.sample(0, 0)
    task = Task(
        t.support_x.to(device), t.support_y.to(device), t.query_x.to(device),
        t.query_y.to(device), t.dataset,
    )
    return Setup(model, theta, task, config, device)


def support_loss_fn(s: Setup) -> Callable[[Params], Tensor]:
    def loss(p: Params) -> Tensor:
        return dice_bce_loss(forward(s.model, p, s.task.support_x), s.task.support_y)

    return loss


# ----------------------------------------------------------------------------- the methods


def ours_imaml(s: Setup, k: int, m: int, hessian: str) -> Runner:
    config = merge(
        s.config,
        {"inner": {"inner_steps": k}, "implicit": {"cg_steps": m, "hessian": hessian}},
    )

    def run() -> tuple[Params, dict[str, Any]]:
        r = meta_gradient("imaml", s.model, s.theta, s.task, config)
        info = {key: r.stats[key] for key in ("cg_status", "cg_residual", "cg_residual_last",
                                              "cg_iterations", "reason") if key in r.stats}
        info["ok"] = r.ok
        return r.grad, info

    return run


def ours_maml(s: Setup, k: int) -> Runner:
    config = merge(s.config, {"inner": {"inner_steps": k}})

    def run() -> tuple[Params, dict[str, Any]]:
        r = meta_gradient("maml", s.model, s.theta, s.task, config)
        return r.grad, {"ok": r.ok}

    return run


def torchopt_imaml(s: Setup, k: int, m: int) -> Runner:
    """iMAML the torchopt way (as in its iMAML example), with plain CG for equal math."""
    import torchopt

    model, names = s.model, list(s.theta)
    lam, lr = s.config.inner.lam, s.config.inner.inner_lr
    rtol, damping = s.config.implicit.rtol, s.config.implicit.damping
    task = s.task

    def objective(phi: tuple[Tensor, ...], theta: tuple[Tensor, ...], x: Tensor, y: Tensor):
        out = functional_call(model, dict(zip(names, phi, strict=True)), (x,))
        prox = sum(((p - t) ** 2).sum() for p, t in zip(phi, theta, strict=True))
        return dice_bce_loss(out, y) + 0.5 * lam * prox

    @torchopt.diff.implicit.custom_root(
        grad(objective, argnums=0),  # optimality: d objective / d phi = 0 at phi*
        argnums=1,
        # A = d optimality / d phi = H + lam I; ridge adds the damping: H + (lam + damping) I
        solve=torchopt.linear_solve.solve_cg(maxiter=m, rtol=rtol, atol=0.0, ridge=damping),
    )
    def inner_solver(phi, theta, x, y):
        theta = tuple(t.detach() for t in theta)
        sgd = torchopt.sgd(lr=lr)
        state = sgd.init(phi)
        with torch.enable_grad():
            for _ in range(k):
                phi = tuple(p.detach().requires_grad_() for p in phi)
                grads = torch.autograd.grad(objective(phi, theta, x, y), phi)
                updates, state = sgd.update(grads, state, inplace=False)
                phi = torchopt.apply_updates(phi, updates, inplace=False)
        return tuple(p.detach() for p in phi)

    def run() -> tuple[Params, dict[str, Any]]:
        theta = tuple(t.detach().requires_grad_() for t in s.theta.values())
        phi0 = tuple(t.detach().clone() for t in theta)
        phi = inner_solver(phi0, theta, task.support_x, task.support_y)
        out = functional_call(model, dict(zip(names, phi, strict=True)), (task.query_x,))
        grads = torch.autograd.grad(dice_bce_loss(out, task.query_y), theta)
        return {n: g.detach() for n, g in zip(names, grads, strict=True)}, {}

    return run


def _cg(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int, rtol: float) -> Tensor:
    """Textbook CG from zero (as in the iMAML authors' code): ``iters`` products, last iterate."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    stop = rtol**2 * float(rr)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rr / torch.dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        if float(rr_new) <= stop:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def higher_imaml(s: Setup, k: int, m: int) -> Runner:
    """iMAML the higher way: ``innerloop_ctx`` inner loop, double-backward HVPs, hand-written CG.

    The support gradient's graph at phi is built once and kept (``retain_graph``), so each CG
    product is one double-backward pass: the fastest form of this approach (the iMAML authors'
    code rebuilt the graph for every product)."""
    import higher

    model = copy.deepcopy(s.model)
    names = [n for n, _ in model.named_parameters()]
    if names != list(s.theta):
        raise RuntimeError("module parameter order differs from theta's")
    with torch.no_grad():
        for p, t in zip(model.parameters(), s.theta.values(), strict=True):
            p.copy_(t)
    opt = torch.optim.SGD(model.parameters(), lr=s.config.inner.inner_lr)
    lam, rtol, damping = s.config.inner.lam, s.config.implicit.rtol, s.config.implicit.damping
    anchor = [t.detach() for t in s.theta.values()]
    task = s.task

    def run() -> tuple[Params, dict[str, Any]]:
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=True, track_higher_grads=False
        ) as (fmodel, diffopt):
            for _ in range(k):
                prox = sum(((p - t) ** 2).sum() for p, t in zip(fmodel.parameters(), anchor,
                                                                strict=True))
                diffopt.step(dice_bce_loss(fmodel(task.support_x), task.support_y)
                             + 0.5 * lam * prox)
            phi = [p.detach().requires_grad_() for p in fmodel.parameters()]
            query = dice_bce_loss(fmodel(task.query_x, params=phi), task.query_y)
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(query, phi)])
            support = dice_bce_loss(fmodel(task.support_x, params=phi), task.support_y)
            sgrad = torch.autograd.grad(support, phi, create_graph=True)
            sizes = [p.numel() for p in phi]

            def matvec(v: Tensor) -> Tensor:
                vs = [c.view_as(p) for c, p in zip(v.split(sizes), phi, strict=True)]
                hv = torch.autograd.grad(sgrad, phi, vs, retain_graph=True, allow_unused=True)
                flat = torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1)
                                  for h, p in zip(hv, phi, strict=True)])
                return v + (flat + damping * v) / lam

            v = _cg(matvec, g, m, rtol)
        return {n: t.clone() for n, t in unflatten(v, s.theta).items()}, {}

    return run


def make_runner(s: Setup, method: str, k: int, m: int | None) -> Runner:
    if method == OURS_EXACT:
        return ours_imaml(s, k, m, "exact")
    if method == OURS_GGN:
        return ours_imaml(s, k, m, "ggn")
    if method == MAML:
        return ours_maml(s, k)
    if method == TORCHOPT:
        return torchopt_imaml(s, k, m)
    if method == HIGHER:
        return higher_imaml(s, k, m)
    raise ValueError(method)


# ----------------------------------------------------------------------------- primitives


def primitive_runners(s: Setup) -> dict[str, Callable[[], Any]]:
    """One support-loss gradient, HVP, GGN product (and its setup), double-backward HVP, forward."""
    loss = support_loss_fn(s)
    theta = {k: t.detach() for k, t in s.theta.items()}
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen).to(s.device) for k, t in theta.items()}
    output = lambda p: forward(s.model, p, s.task.support_x)  # noqa: E731
    curvature = ggn_curvature(dice_bce_loss)(s.task.support_y)
    ggn = ggn_matvec(output, curvature, theta)
    leaves = {k: t.clone().requires_grad_() for k, t in theta.items()}
    sgrad = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)

    def t_grad() -> Any:
        return grad_and_value(loss)(theta)

    def double_backward() -> Any:
        return torch.autograd.grad(sgrad, list(leaves.values()), list(v.values()),
                                   retain_graph=True)

    ours_hvp = hvp_matvec(loss, theta)  # what CG uses: the gradient's graph, recorded once

    def t_forward() -> Any:
        with torch.no_grad():
            return output(theta)

    return {
        "t_grad": t_grad,
        "t_hvp": lambda: ours_hvp(v),
        "t_hvp_setup": lambda: hvp_matvec(loss, theta),
        "t_ggn": lambda: ggn(v),
        "t_ggn_setup": lambda: ggn_matvec(output, curvature, theta),
        "t_hvp_double_backward_kept_graph": double_backward,
        "t_hvp_forward_over_reverse": lambda: hvp(loss, theta, v),
        "t_forward_no_grad": t_forward,
    }


# ----------------------------------------------------------------------------- memory


def memory_child(spec: dict[str, Any]) -> None:
    """Child mode: peak memory of each job of ``spec`` in this fresh process; prints JSON."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    s = build_setup(spec["resolution"], tuple(spec["features"]), device, spec["damping"],
                    spec["inner_lr"])
    prims = None
    out = []
    for job in spec["jobs"]:
        if job["method"].startswith("t_"):
            prims = prims or primitive_runners(s)
            fn = prims[job["method"]]
        else:
            fn = make_runner(s, job["method"], job["k"], job.get("m"))
        fn()  # warm-up: lazily created buffers and kernels are not the call's cost
        out.append(dict(job, **common.peak_memory(fn, device)))
    print(json.dumps(out))


def measure_memory(
    jobs: list[dict[str, Any]], s: Setup, settings: dict[str, Any], one_child: bool
) -> list[dict[str, Any]]:
    """Peak memory of each job: in-process on CUDA, else in child processes."""
    if s.device.type == "cuda":
        prims = primitive_runners(s)
        results = []
        for job in jobs:
            if job["method"].startswith("t_"):
                fn = prims[job["method"]]
            else:
                fn = make_runner(s, job["method"], job["k"], job.get("m"))
            fn()
            results.append(dict(job, **common.peak_memory(fn, s.device)))
        return results
    base = {k: settings[k] for k in ("resolution", "features", "damping", "inner_lr")}
    base["threads"] = MEMORY_CHILD_THREADS
    groups = [jobs] if one_child else [[job] for job in jobs]
    results = []
    for group in groups:
        spec = dict(base, jobs=group)
        results += common.run_child(SCRIPT, ["--child-memory", json.dumps(spec)], timeout=900)
        common.log(f"  memory {[ (j['method'], j.get('k'), j.get('m')) for j in group]} done")
    return results


# ----------------------------------------------------------------------------- main


def cosine(a: Params, b: Params) -> float:
    x, y = flatten(a).double(), flatten(b).double()
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else math.nan


def rel_error(a: Params, reference: Params) -> float:
    x, y = flatten(a).double(), flatten(reference).double()
    return float((x - y).norm() / y.norm()) if float(y.norm()) > 0 else math.nan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser(
        __doc__, DEFAULT_OUT, resolution="px (default 64; quick 32)",
        quick="tiny smoke configuration (32 px, features 4..16, k 1 2, m 2, 1 rep)",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="inner steps")
    parser.add_argument("--ms", type=int, nargs="+", default=None, help="CG steps")
    parser.add_argument("--features", type=int, nargs=6, default=None)
    parser.add_argument("--damping", type=float, default=None,
                        help="added to H in every method's system (default 50; see README)")
    parser.add_argument("--inner-lr", type=float, default=None,
                        help="inner SGD step (default 0.05, a stable one; see README)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_memory:
        memory_child(json.loads(args.child_memory))
        return 0
    preset = dict(QUICK if args.quick else FULL)
    for key in ("resolution", "threads", "repeats", "ks", "ms", "features", "damping", "inner_lr"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    preset["features"] = tuple(preset["features"])
    torch.set_num_threads(preset["threads"])
    device = common.pick_device(args.device)
    if device.type == "cuda":  # float32 for the agreement check: no TF32 in convs or matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    started = time.time()
    env = common.environment(device)
    peers = {
        module: {"status": common.peer_status(module), "version": common.package_version(module)}
        for module in PEER_MODULE.values()
    }
    if peers["torchopt"]["status"] == "ok":
        from torchopt import accelerated_op

        peers["torchopt"]["accelerated_op_available"] = bool(accelerated_op.is_available())
    s = build_setup(preset["resolution"], preset["features"], device, preset["damping"],
                    preset["inner_lr"])
    settings = dict(preset, shots=5, query_size=5, lam=s.config.inner.lam,
                    rtol=s.config.implicit.rtol,
                    num_params=num_params(s.theta), memory=not args.no_memory)
    common.log(f"meta_gradient bench: {settings} on {device}, load {common.load_average()}")

    # 1. primitives (after a check that the thread count is not oversubscribed)
    prims = primitive_runners(s)
    thread_check = common.thread_check(prims["t_grad"], device)
    primitives = {}
    for name, fn in prims.items():
        warmup = 1 if args.quick else 2
        primitives[name] = common.time_repeated(fn, device, preset["primitive_repeats"], warmup)
        common.log(f"  {name}: {primitives[name]['median_s']:.4f} s")
    t_grad = primitives["t_grad"]["median_s"]
    t_hvp, t_ggn = primitives["t_hvp"]["median_s"], primitives["t_ggn"]["median_s"]
    t_curv = {OURS_EXACT: t_hvp, OURS_GGN: t_ggn, TORCHOPT: t_hvp, HIGHER: t_hvp}
    load_primitives = common.load_average()

    # 2. meta-gradients, round-robin per k
    rows: list[dict[str, Any]] = []
    for k in preset["ks"]:
        configs = [(meth, m) for m in preset["ms"] for meth in IMAML_METHODS] + [(MAML, None)]
        runners: dict[tuple[str, int | None], Runner] = {}
        grads: dict[tuple[str, int | None], Params] = {}
        row_of: dict[tuple[str, int | None], dict[str, Any]] = {}
        for meth, m in configs:
            row = {"method": meth, "k": k, "m": m, "status": "ok"}
            row_of[(meth, m)] = row
            rows.append(row)
            if meth in PEER_MODULE and peers[PEER_MODULE[meth]]["status"] != "ok":
                row["status"] = peers[PEER_MODULE[meth]]["status"]
                continue
            try:
                runner = make_runner(s, meth, k, m)
                g, info = runner()  # warm-up; this meta-gradient is the one compared
            except Exception as err:  # noqa: BLE001 - a peer failing is reported, not fatal
                if meth not in PEER_MODULE:
                    raise
                row["status"] = f"unavailable: failed at run ({type(err).__name__}: {err})"
                common.log(f"  {meth} k={k} m={m}: {row['status']}")
                continue
            runners[(meth, m)], grads[(meth, m)] = runner, g
            row["info"] = info
            if info.get("ok") is False:
                row["status"] = f"failed: {info.get('reason')}"
            if "cg_iterations" in info:  # ours: did CG do all m products (equal work)?
                row["cg_full"] = (info["cg_iterations"] == m and info["cg_status"] == "maxiter")
        times: dict[tuple[str, int | None], list[float]] = {c: [] for c in runners}
        for _ in range(preset["repeats"]):
            for c, runner in runners.items():
                times[c].append(common.time_once(runner, device)[0])
        for c, ts in times.items():
            row = row_of[c]
            row.update(common.summary(ts))
            row["grad_equivalents"] = row["median_s"] / t_grad
            meth, m = c
            if meth in IMAML_METHODS:
                row["ideal_s"] = (k + 1) * t_grad + m * t_curv[meth]
                row["ratio_to_ideal"] = row["median_s"] / row["ideal_s"]
                reference = grads.get((OURS_EXACT, m))
                if meth != OURS_EXACT and row_of[(OURS_EXACT, m)]["status"] == "ok":
                    row["cosine_vs_ours_exact"] = cosine(grads[c], reference)
                    row["rel_error_vs_ours_exact"] = rel_error(grads[c], reference)
        done = ", ".join(f"{c[0]}/m={c[1]} {statistics.median(ts):.3f}s" for c, ts in times.items())
        common.log(f"  k={k}: {done}  load {common.load_average()}")
    load_timing = common.load_average()

    # 4. memory
    memory_note = None
    if not args.no_memory:
        jobs = [{"method": name} for name in ("t_grad", "t_hvp_setup", "t_hvp", "t_ggn")]
        jobs += [{"method": r["method"], "k": r["k"], "m": r["m"]} for r in rows
                 if r["status"] == "ok" or r["status"].startswith("failed")]
        mem = measure_memory(jobs, s, settings, one_child=args.quick)
        memory_note = mem[0]["counter"] if mem else None
        for result in mem:
            if result["method"].startswith("t_"):
                primitives[result["method"]]["peak_bytes"] = result["peak_bytes"]
                primitives[result["method"]]["peak_mib"] = result["peak_bytes"] / common.MiB
                continue
            for r in rows:
                if (r["method"], r["k"], r["m"]) == (result["method"], result["k"], result["m"]):
                    r["peak_bytes"] = result["peak_bytes"]
                    r["peak_mib"] = result["peak_bytes"] / common.MiB
    load_memory = common.load_average()

    summary, goals = summarise(rows, preset, peers)
    payload = {
        "benchmark": "meta_gradient",
        "command": " ".join(sys.argv),
        "settings": settings,
        "environment": env,
        "peers": peers,
        "memory_method": (
            "cuda.max_memory_allocated - memory_allocated, in process" if device.type == "cuda"
            else f"fresh child process{' (one for all, --quick)' if args.quick else ' per config'}"
                 f", {MEMORY_CHILD_THREADS} thread, MALLOC_MMAP_THRESHOLD_=65536, warm-up call, "
                 f"then {memory_note}"
        ),
        "primitives": primitives,
        "results": rows,
        "summary": summary,
        "goals": goals,
        "load_average": {"after_primitives": load_primitives, "after_timing": load_timing,
                         "after_memory": load_memory, "end": common.load_average()},
        "thread_check": thread_check,
        "warnings": common.machine_warnings(env, thread_check,
                                            [load_primitives, load_timing, load_memory]),
        "wall_s": time.time() - started,
    }
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nwrote {args.out}")
    return 0


def _row(rows: list[dict[str, Any]], method: str, k: int, m: int | None) -> dict[str, Any] | None:
    for r in rows:
        if (r["method"], r["k"], r["m"]) == (method, k, m):
            return r
    return None


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row["status"] == "ok" and "median_s" in row


def summarise(
    rows: list[dict[str, Any]], preset: dict[str, Any], peers: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ks, ms = list(preset["ks"]), list(preset["ms"])
    k_lo, k_hi = min(ks), max(ks)
    speedups, per_config = [], []
    for k in ks:
        for m in ms:
            ours = _row(rows, OURS_EXACT, k, m)
            peer_rows = [r for r in (_row(rows, TORCHOPT, k, m), _row(rows, HIGHER, k, m))
                         if _ok(r)]
            entry: dict[str, Any] = {"k": k, "m": m}
            if _ok(ours) and peer_rows:
                fastest = min(peer_rows, key=lambda r: r["median_s"])
                entry.update(fastest_peer=fastest["method"],
                             speedup_vs_fastest_peer=fastest["median_s"] / ours["median_s"])
                speedups.append(entry["speedup_vs_fastest_peer"])
                ggn = _row(rows, OURS_GGN, k, m)
                if _ok(ggn):
                    entry["speedup_ggn_vs_fastest_peer"] = fastest["median_s"] / ggn["median_s"]
            for r in peer_rows:
                entry[f"memory_ratio_ours_to_{r['method']}"] = (
                    ours["peak_bytes"] / r["peak_bytes"]
                    if _ok(ours) and "peak_bytes" in ours and r.get("peak_bytes") else None
                )
            per_config.append(entry)
    ideal = {meth: [r["ratio_to_ideal"] for r in rows if r["method"] == meth and _ok(r)]
             for meth in IMAML_METHODS}
    flat = {}
    for meth in IMAML_METHODS:
        for m in ms:
            lo, hi = _row(rows, meth, k_lo, m), _row(rows, meth, k_hi, m)
            if _ok(lo) and _ok(hi) and lo.get("peak_bytes") and "peak_bytes" in hi:
                flat[f"{meth}/m={m}"] = hi["peak_bytes"] / lo["peak_bytes"]
    maml = [r for r in rows if r["method"] == MAML and _ok(r) and "peak_bytes" in r]
    maml_growth = None
    if len(maml) >= 2:
        lo, hi = maml[0], maml[-1]
        maml_growth = {
            "peak_mib_by_k": {str(r["k"]): r["peak_mib"] for r in maml},
            f"ratio_k{hi['k']}_to_k{lo['k']}": hi["peak_bytes"] / lo["peak_bytes"],
            "mib_per_inner_step": (hi["peak_mib"] - lo["peak_mib"]) / (hi["k"] - lo["k"]),
            "time_s_by_k": {str(r["k"]): r["median_s"] for r in maml},
        }
    cosines = {f"{r['method']}/k={r['k']}/m={r['m']}": r["cosine_vs_ours_exact"]
               for r in rows if r["method"] in PEER_MODULE and "cosine_vs_ours_exact" in r}
    summary = {
        "per_config": per_config,
        "speedup_vs_fastest_peer": {
            "min": min(speedups) if speedups else None,
            "geomean": math.exp(statistics.fmean(map(math.log, speedups))) if speedups else None,
            "max": max(speedups) if speedups else None,
        },
        "ratio_to_ideal_max": {meth: max(v) if v else None for meth, v in ideal.items()},
        f"peak_ratio_k{k_hi}_to_k{k_lo}": flat,
        "maml_memory_growth": maml_growth,
        "peer_cosine_vs_ours_exact": cosines,
    }
    peers_available = any(p["status"] == "ok" for p in peers.values())
    goals = [
        {
            "name": f"ours-imaml-exact at least {GOAL_SPEEDUP}x faster than the faster peer "
                    "(every k, m)",
            "value": summary["speedup_vs_fastest_peer"]["min"],
            "met": (min(speedups) >= GOAL_SPEEDUP) if speedups else None,
            "note": None if speedups else (
                "no peer available" if not peers_available else "no comparable configuration"),
        },
        {
            "name": f"measured / ideal <= {GOAL_IDEAL} for ours-imaml-exact (every k, m)",
            "value": summary["ratio_to_ideal_max"][OURS_EXACT],
            "met": _le(summary["ratio_to_ideal_max"][OURS_EXACT], GOAL_IDEAL),
        },
        {
            "name": f"measured / ideal <= {GOAL_IDEAL} for ours-imaml-ggn (every k, m)",
            "value": summary["ratio_to_ideal_max"][OURS_GGN],
            "met": _le(summary["ratio_to_ideal_max"][OURS_GGN], GOAL_IDEAL),
        },
    ]
    for meth in (OURS_EXACT, OURS_GGN):
        values = [v for key, v in flat.items() if key.startswith(meth + "/")]
        goals.append({
            "name": f"{meth} peak memory k={k_hi} / k={k_lo} <= {GOAL_FLAT_MEMORY} (every m)",
            "value": max(values) if values else None,
            "met": _le(max(values) if values else None, GOAL_FLAT_MEMORY),
        })
    full = [r.get("cg_full") for r in rows if r["method"] == OURS_EXACT and "cg_full" in r]
    goals.append({
        "name": "equal work: ours-imaml-exact's CG did all m products (no guard fired; check)",
        "value": f"{sum(map(bool, full))}/{len(full)}",
        "met": all(full) if full else None,
    })
    goals.append({
        "name": f"peers' meta-gradients agree with ours: cosine > {GOAL_COSINE} (check)",
        "value": min(cosines.values()) if cosines else None,
        "met": (min(cosines.values()) > GOAL_COSINE) if cosines else None,
        "note": None if cosines else "no peer available",
    })
    return summary, goals


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def report(p: dict[str, Any]) -> str:
    out = []
    env, st = p["environment"], p["settings"]
    out.append(
        f"meta-gradient benchmark: {st['resolution']} px, features {list(st['features'])} "
        f"({st['num_params']} params), 5+5 images, lam {st['lam']}, inner lr {st['inner_lr']}, "
        f"{env['device']}, {env['torch_num_threads']} threads, {env['cpu_model']}, "
        f"torch {env['torch']}"
    )
    out.append("peers: " + "; ".join(f"{n} {v['version'] or ''} {v['status']}".replace("  ", " ")
                                     for n, v in p["peers"].items()))
    la = p["load_average"]
    out.append(f"load average (1/5/15 min): start {env['load_average_start']}, after primitives "
               f"{la['after_primitives']}, after timing {la['after_timing']}, end {la['end']}")
    for warning in p["warnings"]:
        out.append(f"WARNING: {warning}")
    prim = p["primitives"]
    out.append("")
    out.append(common.table(
        ["primitive", "median s", "x t_grad", "peak MiB"],
        [[n, v["median_s"], v["median_s"] / prim["t_grad"]["median_s"], v.get("peak_mib")]
         for n, v in prim.items()],
        title="Primitives (support set)",
    ))
    out.append("")
    rows = []
    for r in p["results"]:
        if r["status"] != "ok" and "median_s" not in r:
            rows.append([r["method"], r["k"], r["m"], r["status"][:60]] + [None] * 7)
            continue
        info = r.get("info", {})
        cg = f"{int(info['cg_iterations'])} {info['cg_status']}" if "cg_status" in info else None
        rows.append([
            r["method"], r["k"], r["m"], r["status"], r["median_s"], r.get("ideal_s"),
            r.get("ratio_to_ideal"), r["grad_equivalents"], r.get("peak_mib"),
            r.get("cosine_vs_ours_exact"), cg,
        ])
    out.append(common.table(
        ["method", "k", "m", "status", "median s", "ideal s", "x ideal", "grad-eq", "peak MiB",
         "cos vs ours", "our CG"],
        rows, title="One meta-gradient (ideal = (k+1) t_grad + m t_hvp; t_ggn for the ggn row)",
    ))
    out.append("")
    sm = p["summary"]
    out.append(common.table(
        ["k", "m", "fastest peer", "speedup (exact)", "speedup (ggn)"],
        [[e["k"], e["m"], e.get("fastest_peer"), e.get("speedup_vs_fastest_peer"),
          e.get("speedup_ggn_vs_fastest_peer")] for e in sm["per_config"]],
        title="Ours vs the faster of torchopt and higher (time_peer / time_ours)",
    ))
    out.append("")
    if sm["maml_memory_growth"]:
        g = sm["maml_memory_growth"]
        out.append("MAML peak MiB by k: " + ", ".join(f"k={k}: {v:.1f}"
                                                     for k, v in g["peak_mib_by_k"].items())
                   + f"; {g['mib_per_inner_step']:.1f} MiB per inner step")
    out.append("iMAML peak ratio k_max/k_min: " + ", ".join(
        f"{k} {v:.3f}" for k, v in next(v for key, v in sm.items()
                                        if key.startswith("peak_ratio")).items()))
    out.append("")
    out.append("Goals")
    for goal in p["goals"]:
        value = common.fmt(goal["value"], 4)
        note = f"  ({goal['note']})" if goal.get("note") else ""
        out.append(f"  [{common.verdict(goal['met']):>6}] {goal['name']}: {value}{note}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
