"""Command line: thin wrappers that parse, build configs and call the library.

Every command prints one clear line and exits non-zero on bad input (a missing file, a corrupt
image, a checkpoint of another architecture), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from imaml_seg import __version__
from imaml_seg.checkpoint import (
    Checkpoint,
    CheckpointError,
    blend_with_start,
    load_checkpoint,
    save_checkpoint,
)
from imaml_seg.config import (
    SUPPORT_CV_RULE_WORDS,
    SUPPORT_CV_RULES,
    ConfigError,
    RunConfig,
    load,
    merge,
)
from imaml_seg.data.validate import DataError

SHIPPED = "shipped"
EXAMPLES = {
    "datasets": "imaml-seg datasets --data-root ../shared/data",
    "meta-train": "imaml-seg meta-train --preset cpu --algorithm imaml "
    "--sources Kvasir-SEG ISIC2018 DRIVE --out runs/imaml",
    "evaluate": "imaml-seg evaluate runs/imaml --target CVC-ClinicDB --shots 1 5 10 --draws 20",
    "adapt": "imaml-seg adapt --model shipped --support my_cases/ --out my_model.safetensors",
    "predict": "imaml-seg predict --model my_model.safetensors --images new_cases/ --out masks/",
    "demo": "imaml-seg demo            # synthetic data, about 5 minutes on 2 cores",
    "experiment": "imaml-seg experiment experiments/unseen_polyp.toml",
}


class UsageError(ValueError):
    """A request that cannot be carried out as asked (refused, not crashed)."""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding the datasets (default: $IMAML_SEG_DATA)")
    p.add_argument(
        "--cache-dir",
        help="cache of preprocessed arrays (default: $IMAML_SEG_CACHE or ~/.cache/imaml-seg)",
    )


def _paths(args: argparse.Namespace, out: Path | None = None):
    from imaml_seg.data.cache import cache_dir_from
    from imaml_seg.data.readers import data_root_from
    from imaml_seg.meta.trainer import Paths

    return Paths(out or Path("."), data_root_from(args.data_root), cache_dir_from(args.cache_dir))


def _run_config(args: argparse.Namespace) -> RunConfig:
    config = load(args.config or args.preset)
    overrides: dict = {}
    if getattr(args, "algorithm", None):
        overrides.setdefault("meta", {})["algorithm"] = args.algorithm
    if getattr(args, "sources", None):
        overrides["sources"] = list(args.sources)
    if getattr(args, "target", None):
        overrides["target"] = args.target
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if getattr(args, "meta_steps", None) is not None:
        overrides.setdefault("meta", {})["meta_steps"] = args.meta_steps
    if getattr(args, "warm_start", None):
        overrides.setdefault("meta", {})["warm_start"] = args.warm_start
    return merge(config, overrides) if overrides else config


def resolve_model(spec: str) -> Checkpoint:
    """A checkpoint by path (file or run folder) or the packaged model (``shipped``)."""
    if spec == SHIPPED:
        from importlib import resources

        path = resources.files("imaml_seg") / "shipped" / "model.safetensors"
        if not path.is_file():
            raise CheckpointError("the shipped model is not part of this installation")
        return load_checkpoint(Path(str(path)))
    return load_checkpoint(spec)


# ----------------------------------------------------------------------------- commands


def cmd_datasets(args: argparse.Namespace) -> int:
    from imaml_seg.data.readers import data_root_from
    from imaml_seg.data.report import dataset_report, format_report

    root = data_root_from(args.data_root)
    if root is None:
        raise UsageError("no data root: pass --data-root DIR or set IMAML_SEG_DATA")
    rows = dataset_report(root)
    print(json.dumps(rows, indent=2) if args.json else format_report(rows))
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from imaml_seg.meta.distributed import init_from_env, shutdown
    from imaml_seg.meta.trainer import device_default, train

    config = _run_config(args)
    device = device_default()
    world = init_from_env(device)
    path = train(
        config,
        _paths(args, Path(args.out)),
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
        world=world,
        device=device,
    )
    shutdown(world)  # only after success: see shutdown()
    if world.is_main and not args.quiet:
        print(f"checkpoint: {path}")
    return 0


def _load_target(spec: str, config: RunConfig, args: argparse.Namespace):
    from imaml_seg.data.cache import load_arrays

    paths = _paths(args)
    return load_arrays(
        spec,
        config.data.resolution,
        data_root=paths.data_root,
        cache_dir=paths.cache_dir,
        progress=not args.quiet,
    )


def _test_time_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inner-steps", type=int, help="adaptation steps (default: the model's)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="adaptation optimizer")
    p.add_argument("--inner-lr", type=float, help="adaptation step size")
    p.add_argument(
        "--augment-support",
        action="store_true",
        help="flip/rotate the labelled images while adapting (k shots act as up to 8k)",
    )
    p.add_argument("--tta", action="store_true", help="average predictions over 8 flips/rotations")
    p.add_argument(
        "--proximal",
        action=argparse.BooleanOptionalAction,
        help="keep iMAML's proximal term while adapting, with the per-tensor strengths the model "
        "learned if it has them (meta.lam_lr); default: the model's eval.proximal",
    )
    p.add_argument(
        "--start-blend",
        type=float,
        metavar="B",
        help="start from (1 - B) x the model's weights + B x the weights it was warm-started "
        "from (its meta.warm_start checkpoint, e.g. transfer's); 0.5 = the midpoint, which "
        "varied less over training seeds on unseen CVC-ClinicDB (docs/study.md)",
    )
    p.add_argument(
        "--support-cv",
        nargs="?",
        const="best",
        choices=SUPPORT_CV_RULES,
        metavar="RULE",
        help="choose the number of adaptation steps (0 up to --inner-steps) by cross-validation "
        "on the labelled images themselves; RULE 'best' (default: the best held-out Dice), "
        "'one_se' (the fewest steps within one standard error of the best) or 'paired_se' (the "
        "same on the per-image differences to the best)",
    )
    p.add_argument(
        "--no-support-cv",
        action="store_true",
        help="adapt the full --inner-steps even where the model's config chooses them by support "
        "cross-validation (as the shipped model's does)",
    )


def _test_time_overrides(args: argparse.Namespace) -> dict:
    """The ``[eval]`` overrides the command line's test-time flags ask for."""
    overrides = {
        key: getattr(args, key)
        for key in ("inner_steps", "optimizer", "inner_lr", "start_blend")
        if getattr(args, key, None) is not None
    }
    for flag in ("augment_support", "tta"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if getattr(args, "proximal", None) is not None:
        overrides["proximal"] = args.proximal
    if getattr(args, "support_cv", None):
        if getattr(args, "no_support_cv", False):
            raise UsageError("--support-cv and --no-support-cv: choose one")
        overrides["support_cv"] = True
        overrides["support_cv_rule"] = args.support_cv
    elif getattr(args, "no_support_cv", False):
        overrides["support_cv"] = False
    return overrides


def with_test_time(ckpt: Checkpoint, args: argparse.Namespace) -> Checkpoint:
    """``ckpt`` with the command line's test-time settings in its config's ``[eval]``; a
    ``--start-blend`` is applied to its weights at once (and recorded in its state), so that
    what is saved from them is never blended twice."""
    from dataclasses import replace

    overrides = _test_time_overrides(args)
    if overrides:
        ckpt = replace(ckpt, config=merge(ckpt.config, {"eval": overrides}))
    blend = ckpt.config.eval.start_blend
    if blend and ckpt.config.eval.blend_only_unadapted:
        raise ConfigError(
            "eval.blend_only_unadapted (in the model's config) is a study setting; on the command "
            "line --start-blend applies to the weights that are adapted"
        )
    if blend:
        ckpt = replace(
            ckpt,
            theta=blend_with_start(ckpt.theta, ckpt.config),
            config=merge(ckpt.config, {"eval": {"start_blend": 0.0}}),
            state={**ckpt.state, "start_blend": blend},
        )
    return ckpt


def method_for(ckpt: Checkpoint, name: str):
    """The evaluation wrapper for a checkpoint: adapt() from its theta as its ``[eval]`` says."""
    from imaml_seg.evaluation import AdaptedModel
    from imaml_seg.meta.trainer import device_default
    from imaml_seg.model import build_model

    device = device_default()
    c = ckpt.config
    return AdaptedModel.from_config(
        name,
        build_model(c.model).to(device),
        {k: v.to(device) for k, v in ckpt.theta.items()},
        c,
        device,
        lam=ckpt.lam,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from imaml_seg.evaluation import evaluate, summarise

    ckpt = with_test_time(resolve_model(args.model), args)
    config = ckpt.config
    target = _load_target(args.target or config.target, config, args)
    ev = replace(
        config.eval,
        shots=tuple(args.shots) if args.shots else config.eval.shots,
        draws=args.draws or config.eval.draws,
    )
    method = method_for(ckpt, config.meta.algorithm)
    records = evaluate([method], target, config.data, ev, seed=args.seed, quiet=args.quiet)
    summary = summarise(records)
    if args.json:
        print(
            json.dumps(
                {"records": records, "summary": {f"{m}@{k}": v for (m, k), v in summary.items()}}
            )
        )
    else:
        for (m, k), s in sorted(summary.items()):
            print(
                f"{m:10s} {target.name:14s} {k:2d}-shot Dice {s['mean']:.3f} "
                f"(95% CI {s['ci_low']:.3f}-{s['ci_high']:.3f}, {s['draws']} draws)"
            )
    return 0


def adapt_on_folder(ckpt: Checkpoint, folder: str, args: argparse.Namespace) -> Checkpoint:
    """``ckpt`` fine-tuned by ``adapt()`` on a labelled folder (images/, masks/)."""
    import torch

    from imaml_seg.data.cache import load_arrays

    support = load_arrays(
        folder,
        ckpt.config.data.resolution,
        data_root=None,
        cache_dir=_paths(args).cache_dir,
        progress=not args.quiet,
    )
    t0 = time.perf_counter()
    ckpt = with_test_time(ckpt, args)
    method = method_for(ckpt, "adapted")
    phi = method.adapt(torch.from_numpy(support.images), torch.from_numpy(support.masks))
    if method.support_cv and len(support.names) == 1 and not args.quiet:
        print(
            f"imaml-seg {args.command}: note: {folder} holds one labelled image, which support "
            f"cross-validation cannot split; adapted {method.steps} steps (--inner-steps 0 "
            "keeps the model as trained, which scored higher on a target close to the training "
            "sources: docs/study.md, 'One shot')",
            file=sys.stderr,
        )
    state = {
        "adapted_from": str(args.model),
        "support": str(Path(folder).resolve()),
        "shots": len(support.names),
        "seconds": round(time.perf_counter() - t0, 2),
        **({"start_blend": ckpt.state["start_blend"]} if "start_blend" in ckpt.state else {}),
        **method.choice,
    }
    return Checkpoint(ckpt.config, {k: v.cpu() for k, v in phi.items()}, 0, {}, state)


def cmd_adapt(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out}: exists; pass --overwrite to replace it")
    adapted = adapt_on_folder(resolve_model(args.model), args.support, args)
    save_checkpoint(out, adapted)
    if not args.quiet:
        state = adapted.state
        rule = SUPPORT_CV_RULE_WORDS[adapted.config.eval.support_cv_rule][0]
        rule = f", {rule}" if rule else ""
        chosen = ""
        if "inner_steps" in state and state["shots"] > 1:
            chosen = f" ({state['inner_steps']} steps by support CV{rule})"
        print(f"adapted on {state['shots']} images in {state['seconds']:.1f} s{chosen} -> {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imaml_seg.predict import check_outputs, predict_folder

    adapting = [
        f"--{'' if value is not False else 'no-'}{k.replace('_', '-')}"
        for k, value in _test_time_overrides(args).items()
        if k not in ("tta", "support_cv_rule", "start_blend")
    ]
    if adapting and not args.support:
        raise UsageError(f"{' '.join(adapting)}: only with --support (they set how it adapts)")
    ckpt = resolve_model(args.model)
    check_outputs(Path(args.images), Path(args.out), args.overwrite)  # refuse before adapting
    if args.support:
        ckpt = adapt_on_folder(ckpt, args.support, args)
    else:
        ckpt = with_test_time(ckpt, args)
    rows = predict_folder(
        ckpt,
        Path(args.images),
        Path(args.out),
        overwrite=args.overwrite,
        quiet=args.quiet,
        threshold=args.threshold,
    )
    if not args.quiet:
        print(f"{len(rows)} masks, overlays and areas.csv written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imaml_seg.demo import run_demo

    run_demo(
        _paths(args, Path(args.out)),
        preset=args.preset,
        real=args.data_root is not None,
        quiet=args.quiet,
        overwrite=args.overwrite,
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from imaml_seg.experiment import markdown_table, run_experiment, update_readme

    paths = _paths(args, Path(args.out) if args.out else None)
    result = run_experiment(
        Path(args.spec), paths, quiet=args.quiet, only=args.only, report_only=args.report_only
    )
    table = markdown_table(result)
    print(table)
    if args.readme and not update_readme(Path(args.readme), result["study"], table):
        raise UsageError(
            f"{args.readme}: no <!-- STUDY:{result['study']} --> ... "
            f"<!-- /STUDY:{result['study']} --> markers to write the table between"
        )
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imaml-seg",
        description="Few-shot medical image segmentation with implicit MAML.",
        epilog="Run 'imaml-seg COMMAND --help' for each command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"imaml-seg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return p

    p = command("datasets", "List the datasets under a data root, their pairs and every problem.")
    _data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_datasets)

    p = command("meta-train", "Meta-train an initialisation on source datasets.")
    p.add_argument("--preset", default="cpu", help="preset name (cpu, paper, demo, ...)")
    p.add_argument("--config", help="a TOML config file (instead of --preset)")
    p.add_argument("--algorithm", help="imaml, maml, fomaml, reptile, transfer or scratch")
    p.add_argument("--sources", nargs="+", help="dataset names, folders or synthetic:<n>")
    p.add_argument("--meta-steps", type=int)
    p.add_argument("--warm-start", help="checkpoint whose weights initialise theta")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="run folder (checkpoint, log, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    _data_args(p)
    p.set_defaults(func=cmd_meta_train)

    p = command("evaluate", "Adapt a model to k shots of a target dataset and score it.")
    p.add_argument("model", help="checkpoint file, run folder, or 'shipped'")
    p.add_argument("--target", help="dataset name, folder, or synthetic:<n>")
    p.add_argument("--shots", type=int, nargs="+")
    p.add_argument("--draws", type=int)
    _test_time_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("adapt", "Adapt a model to a folder of labelled images (images/, masks/).")
    p.add_argument("--model", default=SHIPPED, help="checkpoint or 'shipped' (default)")
    p.add_argument("--support", required=True, help="folder with images/ and masks/")
    p.add_argument("--out", required=True, help="adapted checkpoint to write (.safetensors)")
    _test_time_args(p)
    p.add_argument("--overwrite", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_adapt)

    p = command("predict", "Segment a folder of images: mask PNGs, overlays, areas.csv.")
    p.add_argument("--model", default=SHIPPED, help="checkpoint (e.g. from adapt) or 'shipped'")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="output folder (not inside --images)")
    p.add_argument("--support", help="adapt on this labelled folder first")
    _test_time_args(p)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _data_args(p)
    p.set_defaults(func=cmd_predict)

    p = command("demo", "Meta-train briefly, adapt to an unseen dataset with 5 shots, report Dice.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default=None, help="default: demo (synthetic) or demo-real")
    p.add_argument("--overwrite", action="store_true")
    _data_args(p)
    p.set_defaults(func=cmd_demo)

    p = command("experiment", "Run (or resume) a leave-one-dataset-out study.")
    p.add_argument("spec", help="experiments/<name>.toml")
    p.add_argument("--out", help="results folder (default: the spec's)")
    p.add_argument("--only", nargs="+", help="run only these methods")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run no unit: rebuild the table and figures from the finished units",
    )
    p.add_argument("--readme", help="write the Dice table into this file between its markers")
    _data_args(p)
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    from imaml_seg.meta.trainer import RunExistsError

    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            return args.func(args)
    except (
        DataError,
        ConfigError,
        CheckpointError,
        UsageError,
        RunExistsError,
        FileExistsError,
    ) as err:
        print(f"imaml-seg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imaml-seg {args.command}: interrupted", file=sys.stderr)
        return 130
