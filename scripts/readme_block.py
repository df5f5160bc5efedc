"""Generated blocks of a README: ``<!-- TAG: ARGS -->`` ... ``<!-- /TAG -->``, where ARGS are the
script arguments that print the block's body, so a test can print it again and compare."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


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
