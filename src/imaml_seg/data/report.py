"""What is in a data root: every known dataset found, its pair count and all its problems."""

from __future__ import annotations

import time
from pathlib import Path

from imaml_seg.data.readers import KNOWN_DATASETS, find_datasets
from imaml_seg.data.validate import Problem, validate_pairs


def _relative(problem: Problem, folder: Path) -> str:
    path = Path(problem.path)
    shown = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else problem.path
    return f"{problem.severity}: {shown or '.'}: {problem.message}"


def dataset_report(data_root: Path) -> list[dict]:
    """One row per known dataset under ``data_root``, every pair validated.

    Row keys: ``name``, ``path``, ``pairs`` (image/mask pairs found), ``errors``, ``warnings``,
    ``problems`` (``"<severity>: <file relative to path>: <message>"``, all of them) and
    ``seconds`` (time spent reading and validating).
    """
    rows = []
    for name, folder in find_datasets(Path(data_root)).items():
        start = time.perf_counter()
        pairs, problems = KNOWN_DATASETS[name](folder)
        problems = problems + validate_pairs(pairs)
        rows.append({
            "name": name,
            "path": str(folder),
            "pairs": len(pairs),
            "errors": sum(p.severity == "error" for p in problems),
            "warnings": sum(p.severity == "warning" for p in problems),
            "problems": [_relative(p, folder) for p in problems],
            "seconds": round(time.perf_counter() - start, 2),
        })
    return rows


def format_report(rows: list[dict], max_problems: int = 20) -> str:
    """A readable table of ``dataset_report`` rows, then up to ``max_problems`` per dataset."""
    if not rows:
        return f"no known dataset found (looked for: {', '.join(KNOWN_DATASETS)})"
    header = ("dataset", "pairs", "errors", "warnings", "path")
    table = [header] + [
        (r["name"], str(r["pairs"]), str(r["errors"]), str(r["warnings"]), r["path"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]))
    lines.insert(1, "-" * max(len(line) for line in lines))
    for r in rows:
        if r["problems"]:
            lines.append("")
            lines.append(f"{r['name']}:")
            lines += [f"  {p}" for p in r["problems"][:max_problems]]
            if len(r["problems"]) > max_problems:
                lines.append(f"  ... and {len(r['problems']) - max_problems} more")
    return "\n".join(lines)
