"""Latency and throughput of the user-facing paths, with the cpu preset's network, in one run.

    .venv/bin/python bench/throughput.py [--resolution 128] [--out bench/results/throughput.json]
                                         [--quick] [--threads 2] [--device auto]

1. 5-shot adaptation latency: ``adapt()`` on 5 synthetic support images with the cpu preset's
   inner loop (``imaml_seg.config.load('cpu')``) and its evaluation step count
   (``eval.inner_steps``), from a random initialisation; with ``t_grad`` at the same size for
   the cost model ``steps * t_grad``.
2. ``predict`` throughput: ``imaml_seg.predict.predict_folder`` on a folder of 32 synthetic PNG
   images (written to a temporary folder, ``--image-size`` px square, default the resolution),
   with a checkpoint of a random initialisation saved and loaded the way the CLI does; images/s of
   the whole call (reading, resizing, the network, writing masks, overlays and areas.csv), and for
   reference the network alone (batches of 16, no gradient).
3. Data-loading share: ``TaskSampler.sample`` (5 support + 5 query, augmentation on, from four
   in-memory synthetic source datasets, as meta-training sees them once cached) against one iMAML
   meta-gradient on such a task with the cpu preset's settings (``meta_gradient('imaml', ...)``);
   goal: loading < 5 % of the meta-gradient's time.

Each timing is the median of ``--repeats`` calls after an untimed warm-up; the load average is
recorded before and after each part (the machine may be shared).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import torch
from PIL import Image
from torch.func import grad_and_value

from imaml_seg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from imaml_seg.config import load, merge
from imaml_seg.data.synthetic import render, synthetic_arrays
from imaml_seg.data.tasks import Task, TaskSampler, draw_support
from imaml_seg.losses import dice_bce_loss
from imaml_seg.meta.algorithms import meta_gradient
from imaml_seg.meta.inner import adapt
from imaml_seg.model import build_model, forward, get_params, num_params
from imaml_seg.predict import predict_folder

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "throughput.json"
GOAL_LOADING_SHARE = 0.05

FULL = {"resolution": 128, "features": None, "images": 32, "eval_steps": None, "repeats": 3,
        "sample_draws": 40, "threads": 2}
QUICK = {"resolution": 32, "features": (4, 4, 8, 8, 16, 4), "images": 8, "eval_steps": 2,
         "repeats": 1, "sample_draws": 5, "threads": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser(
        __doc__, DEFAULT_OUT, resolution="px (default 128; quick 32)",
        quick="tiny smoke configuration (32 px, features 4..16, 8 images, 2 steps)",
    )
    parser.add_argument("--images", type=int, default=None, help="PNG images to predict (32)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the PNG images (default: the resolution)")
    parser.add_argument("--features", type=int, nargs=6, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    for key in ("resolution", "threads", "repeats", "images", "features"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    torch.set_num_threads(preset["threads"])
    device = common.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    started = time.time()
    env = common.environment(device)

    base = load("cpu")
    overrides: dict[str, Any] = {"data": {"resolution": preset["resolution"]}}
    if preset["features"] is not None:
        overrides["model"] = {"features": list(preset["features"])}
    if preset["eval_steps"] is not None:
        overrides["eval"] = {"inner_steps": preset["eval_steps"]}
    config = merge(base, overrides)
    r, repeats = config.data.resolution, preset["repeats"]
    image_size = args.image_size or r
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    theta = {k: v.to(device) for k, v in get_params(model).items()}
    settings = {
        "preset": "cpu",
        "resolution": r,
        "features": list(config.model.features),
        "num_params": num_params(theta),
        "inner": {"optimizer": config.inner.optimizer, "inner_lr": config.inner.inner_lr,
                  "lam": config.inner.lam, "train_inner_steps": config.inner.inner_steps},
        "eval_inner_steps": config.eval.inner_steps,
        "eval_proximal": config.eval.proximal,
        "implicit": {"cg_steps": config.implicit.cg_steps, "hessian": config.implicit.hessian},
        "shots": 5,
        "query_size": 5,
        "images": preset["images"],
        "image_size": image_size,
        "repeats": repeats,
        "threads": preset["threads"],
    }
    common.log(f"throughput bench: {settings} on {device}, load {common.load_average()}")
    load_log: dict[str, list[float]] = {"start": common.load_average()}

    # 1. adaptation latency
    target = synthetic_arrays(7, 16, r, config.seed)
    sx, sy = draw_support(target, 5, 0, seed=config.seed, test_fraction=0.5, split_seed=0)
    sx, sy = sx.to(device), sy.to(device)
    steps = config.eval.inner_steps

    def adapt_call() -> Any:
        return adapt(model, theta, sx, sy, config.inner, proximal=config.eval.proximal,
                     steps=steps)

    def grad_call() -> Any:
        return grad_and_value(lambda p: dice_bce_loss(forward(model, p, sx), sy))(theta)

    adapt(model, theta, sx, sy, config.inner, steps=1)  # warm-up (kernels, allocator)
    thread_check = common.thread_check(grad_call, device)
    t_adapt = common.time_repeated(adapt_call, device, repeats, warmup=0)
    t_grad = common.time_repeated(grad_call, device, max(3, 3 * repeats), warmup=1)
    adaptation = {
        "latency": t_adapt,
        "steps": steps,
        "per_step_s": t_adapt["median_s"] / max(steps, 1),
        "t_grad": t_grad,
        "ideal_s": steps * t_grad["median_s"],
        "ratio_to_ideal": t_adapt["median_s"] / (steps * t_grad["median_s"]) if steps else None,
    }
    load_log["after_adaptation"] = common.load_average()
    common.log(f"  adaptation: {t_adapt['median_s']:.3f} s for {steps} steps")

    # 2. predict throughput
    with tempfile.TemporaryDirectory(prefix="imaml-seg-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(preset["images"]):
            image, _ = render(7, 100 + i, image_size, config.seed)
            pixels = (np.transpose(image, (1, 2, 0)) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
        path = save_checkpoint(Path(tmp) / "random-init.safetensors",
                               Checkpoint(config, {k: v.cpu() for k, v in theta.items()}))
        checkpoint = load_checkpoint(path)
        out = Path(tmp) / "out"

        def predict_call() -> Any:
            return predict_folder(checkpoint, folder, out, overwrite=True, quiet=True)

        t_predict = common.time_repeated(predict_call, device, repeats, warmup=1)
        rows = predict_call()
    batch = torch.from_numpy(target.images[:16]).to(device)

    def network_call() -> Any:
        with torch.no_grad():
            return forward(model, theta, batch)

    t_network = common.time_repeated(network_call, device, max(3, repeats), warmup=1)
    prediction = {
        "predict_folder": t_predict,
        "images": len(rows),
        "images_per_s": len(rows) / t_predict["median_s"],
        "network_only_batch16": t_network,
        "network_only_images_per_s": 16 / t_network["median_s"],
        "predict_device": str(common.pick_device("auto")),
    }
    load_log["after_predict"] = common.load_average()
    common.log(f"  predict: {prediction['images_per_s']:.1f} images/s")

    # 3. data loading vs one iMAML meta-gradient
    sources = [synthetic_arrays(d, 64, r, config.seed) for d in range(4)]
    sampler = TaskSampler(sources, shots=5, query_size=5, seed=config.seed,
                          test_fraction=config.data.test_fraction,
                          split_seed=config.data.split_seed, augment=True)
    sampler.sample(0, 0)
    sample_times = [common.time_once(lambda i=i: sampler.sample(1 + i, 0), device)[0]
                    for i in range(preset["sample_draws"])]
    t_sample = common.summary(sample_times)
    cpu_task = sampler.sample(0, 0)
    task = Task(cpu_task.support_x.to(device), cpu_task.support_y.to(device),
                cpu_task.query_x.to(device), cpu_task.query_y.to(device), cpu_task.dataset)
    statuses = []

    def meta_call() -> Any:
        result = meta_gradient("imaml", model, theta, task, config)
        statuses.append("ok" if result.ok else f"failed: {result.stats.get('reason')}")
        return result

    t_meta = common.time_repeated(meta_call, device, repeats, warmup=1)
    share = t_sample["median_s"] / t_meta["median_s"]
    loading = {
        "sample": t_sample,
        "sample_includes_transfer_to_device": False,
        "imaml_meta_gradient": t_meta,
        "meta_gradient_status": statuses[-1],
        "loading_share": share,
    }
    load_log["end"] = common.load_average()
    common.log(f"  loading share: {share:.4f}")

    goals = [{
        "name": f"data loading < {GOAL_LOADING_SHARE:.0%} of one iMAML meta-gradient "
                "(TaskSampler.sample / meta_gradient)",
        "value": share,
        "met": share < GOAL_LOADING_SHARE,
    }]
    payload = {
        "benchmark": "throughput",
        "command": " ".join(sys.argv),
        "settings": settings,
        "environment": env,
        "adaptation": adaptation,
        "prediction": prediction,
        "data_loading": loading,
        "goals": goals,
        "load_average": load_log,
        "thread_check": thread_check,
        "warnings": common.machine_warnings(env, thread_check, list(load_log.values())),
        "wall_s": time.time() - started,
    }
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nwrote {args.out}")
    return 0


def report(p: dict[str, Any]) -> str:
    env, st = p["environment"], p["settings"]
    a, pr, dl = p["adaptation"], p["prediction"], p["data_loading"]
    out = [
        f"throughput benchmark: {st['resolution']} px, features {st['features']} "
        f"({st['num_params']} params), cpu preset, {env['device']}, "
        f"{env['torch_num_threads']} threads, {env['cpu_model']}, torch {env['torch']}",
        "load average (1/5/15 min): " + ", ".join(f"{k} {v}" for k, v in p["load_average"].items()),
    ]
    out += [f"WARNING: {warning}" for warning in p["warnings"]]
    out.append("")
    rows = [
        ["5-shot adapt() latency", f"{a['latency']['median_s']:.3f} s",
         f"{a['steps']} steps, {a['per_step_s']:.3f} s/step, "
         f"x{common.fmt(a['ratio_to_ideal'])} of steps*t_grad ({a['t_grad']['median_s']:.3f} s)"],
        ["predict_folder", f"{pr['images_per_s']:.1f} img/s",
         f"{pr['images']} PNGs of {st['image_size']} px in {pr['predict_folder']['median_s']:.2f} s"
         f" on {pr['predict_device']}"],
        ["network only (batch 16)", f"{pr['network_only_images_per_s']:.1f} img/s",
         f"{pr['network_only_batch16']['median_s']:.3f} s per batch"],
        ["TaskSampler.sample", f"{dl['sample']['median_s'] * 1000:.2f} ms",
         "5+5 images, augmented"],
        ["iMAML meta-gradient", f"{dl['imaml_meta_gradient']['median_s']:.3f} s",
         f"inner {st['inner']['train_inner_steps']}, cg {st['implicit']['cg_steps']} "
         f"({st['implicit']['hessian']}), {dl['meta_gradient_status']}"],
        ["loading share", f"{dl['loading_share']:.2%}", "sample / meta-gradient"],
    ]
    out.append(common.table(["what", "value", "detail"], rows))
    out += ["", "Goals"]
    for goal in p["goals"]:
        out.append(f"  [{common.verdict(goal['met']):>6}] {goal['name']}: "
                   f"{common.fmt(goal['value'], 4)}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
