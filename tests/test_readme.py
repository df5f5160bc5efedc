"""The README's two commands stay true (CI runs the test command verbatim, the demo exists), and
every generated block of the README and of the full study report matches what ``results/`` holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
REPORTS = ("README.md", "docs/study.md")


def reports() -> dict[str, str]:
    """Each file that holds generated tables, by its path in the repository: its text."""
    return {name: (REPO / name).read_text() for name in REPORTS}


def commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_opens_with_exactly_two_commands() -> None:
    demo, tests = commands()
    assert demo.endswith("imaml-seg demo") and "pip install" in demo
    assert tests.endswith("pytest -q") and "'.[dev]'" in tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands()[1] in ci


def test_study_tables_in_the_reports_match_their_results() -> None:
    import json

    from imaml_seg.experiment import markdown_table

    for path, text in reports().items():
        for name in re.findall(r"<!-- STUDY:(\w+) -->", text):
            result = json.loads((REPO / "results" / f"{name}.json").read_text())
            block = text.split(f"<!-- STUDY:{name} -->\n", 1)[1].split(f"<!-- /STUDY:{name} -->")[0]
            assert block == markdown_table(result), f"{path}: table of {name} is stale"


def test_each_study_table_is_in_one_report_once() -> None:
    names = [n for text in reports().values() for n in re.findall(r"<!-- STUDY:(\w+) -->", text)]
    assert len(names) > 3
    assert sorted(names) == sorted(set(names)), "a study's table is written in two places"


def test_demo_table_in_the_readme_matches_its_result() -> None:
    import json

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- DEMO -->\n```text\n", 1)[1].split("\n```\n<!-- /DEMO -->")[0]
    result = json.loads((REPO / "results" / "demo.json").read_text())
    assert block == result["table"].rstrip("\n")


def script_blocks(module) -> list[tuple[str, list[str], str]]:
    """Every block a README-writing script owns in the reports: (file, its arguments, its body)."""
    blocks = [(path, *b) for path, text in reports().items() for b in module.readme_blocks(text)]
    assert blocks, f"the reports have no block of {module.__name__}"
    return blocks


def parse(module, args: list[str]):
    """A block's arguments as its script parses them, reading this repository's results."""
    return module.parser().parse_args([*args, "--root", str(REPO)])


def test_seed_tables_in_the_reports_match_their_results() -> None:
    seed_spread = load_script("seed_spread")
    for path, args, block in script_blocks(seed_spread):
        assert block == seed_spread.tables(parse(seed_spread, args)) + "\n", (
            f"{path}: seed tables {args} are stale"
        )


def test_budget_tables_in_the_readme_match_their_results() -> None:
    budget_table = load_script("budget_table")
    blocks = budget_table.readme_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 3, "the README should hold the three splits' budget tables"
    for args, block in blocks:
        parsed = budget_table.parser().parse_args([*args, "--root", str(REPO)])
        assert block == budget_table.table(parsed), f"README budget table {args} is stale"


@pytest.mark.parametrize("script", ["support_select", "source_scores", "learned_strengths"])
def test_tables_of_weight_scoring_scripts_match_their_saved_scores(script: str) -> None:
    """Scripts that score weights save what they computed; the reports' blocks reprint from it."""
    module = load_script(script)
    for path, args, block in script_blocks(module):
        parsed = parse(module, args)
        assert block == module.make(parsed, compute=False) + "\n", (
            f"{path}: {module.TAG} table {args} is stale"
        )


def test_compute_tables_in_the_reports_match_their_results() -> None:
    compute_curve = load_script("compute_curve")
    for path, args, block in script_blocks(compute_curve):
        parsed = parse(compute_curve, args)
        assert parsed.png is None, f"{path}: a COMPUTE block's arguments draw no figure"
        assert block == compute_curve.make(parsed) + "\n", f"{path}: COMPUTE table {args} is stale"
