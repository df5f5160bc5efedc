"""Generated blocks of a README: ``<!-- TAG: ARGS -->`` ... ``<!-- /TAG -->``, where ARGS are the
script arguments that print the block's body, so a test can print it again and compare."""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from imaml_seg.config import ConfigError
from imaml_seg.data.cache import SegArrays, cache_dir_from, load_arrays
from imaml_seg.data.readers import data_root_from
from imaml_seg.data.validate import DataError


def _pattern(tag: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- {tag}: (.+?) -->\n(.*?)<!-- /{tag} -->", re.S)


def blocks(text: str, tag: str) -> list[tuple[list[str], str]]:
    """Each ``tag`` block of ``text``: its arguments and its body."""
    return [(shlex.split(m.group(1)), m.group(2)) for m in _pattern(tag).finditer(text)]


def write(readme: Path, tag: str, args: list[str], body: str) -> bool:
    """Put ``body`` into the ``tag`` block of ``readme`` made with ``args``; False if none is."""
    text = readme.read_text()
    for m in _pattern(tag).finditer(text):
        if shlex.split(m.group(1)) == args:
            readme.write_text(text[: m.start(2)] + body + text[m.end(2):])
            return True
    return False


def block_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--readme`` and ``--root`` (and their values): what names a block."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--readme", "--root"):
            skip = True
        elif not a.startswith(("--readme=", "--root=")):
            out.append(a)
    return out


def run(
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    make: Callable[[argparse.Namespace], str],
    tag: str,
) -> int:
    """A block-printing script's ``main``: print ``make(args)``, or with ``--readme`` write it
    into that README's ``tag`` block named by ``argv``; 2 and one line on stderr on bad input
    (``make`` raises ConfigError) or a missing block."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        body = make(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    body = body if body.endswith("\n") else body + "\n"
    if args.readme is None:
        print(body, end="")
        return 0
    own = block_args(argv)
    if not write(args.readme, tag, own, body):
        print(f"error: {args.readme} has no '<!-- {tag}: {shlex.join(own)} -->' block",
              file=sys.stderr)
        return 2
    print(f"wrote the {tag} block '{shlex.join(own)}' into {args.readme}")
    return 0


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--root``, ``--readme`` and the data options of a script that reads weights and images."""
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--readme", type=Path, help="write the table into this README's block")
    parser.add_argument("--data-root",
                        help="folder holding the datasets (default: $IMAML_SEG_DATA)")
    parser.add_argument("--cache-dir", help="cache of preprocessed arrays (default: "
                        "$IMAML_SEG_CACHE or ~/.cache/imaml-seg)")


def dataset_loader(args: argparse.Namespace, resolution: int) -> Callable[[str], SegArrays]:
    """``load(name)``: a dataset at ``resolution`` from ``args``' data root and cache, read once;
    a bad dataset raises ConfigError (one line for the user, no traceback)."""

    @functools.cache
    def load(name: str) -> SegArrays:
        try:
            return load_arrays(name, resolution, data_root=data_root_from(args.data_root),
                               cache_dir=cache_dir_from(args.cache_dir))
        except DataError as err:
            raise ConfigError(str(err)) from err

    return load
