"""Every name the repository's prose points at exists.

Docstrings, comments, presets and READMEs name modules (``e2ed2.engine.core.step_cuts.CutUnroll``),
commands (``deepspeed --module e2ed2.engine.cli.train``) and files (``benchmarks/bench_lora.py``).
Renames leave such names dangling, and a user who copies a preset's launch line gets "No module
named ...". This resolves each of them: dotted names by import and attribute lookup, ``-m`` /
``--module`` targets as runnable modules (a module file, or a package with ``__main__``), and
paths under a top-level folder or an engine wing against the repository (from the root, from
``engine/``, or from the naming file's folder). Markdown links (``[text](path#anchor)``) in the
READMEs and ``docs/`` must point at a file in the repository and, into a markdown file, at one of
its headings as GitHub renders the anchor.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = {"engine", "kernels", "configs", "ds_configs", "benchmarks", "experiments", "tests"}
TOP_FOLDERS |= {"docs"}
ENGINE_WINGS = {"config", "core", "data", "objectives", "train", "eval", "cli"}
# Files written by runs, not shipped: their paths are named as outputs, never resolved.
GENERATED = ("results", "runs")

_DOTTED = re.compile(r"\be2ed2\.(?:engine|kernels|configs|ds_configs)(?:\.[A-Za-z_]\w*)*")
_RUN_MODULE = re.compile(r"(?:\s-m|--module)\s+(e2ed2(?:\.\w+)+)")
_PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)+[\w-]+\.(?:py|toml|json|md|txt|sh))\b")
# A markdown link or image: [text](target) / ![alt](target); the text may wrap onto the next line
# (not across a blank one), the target has no spaces here.
_LINK = re.compile(r"\[(?:[^\]\n]|\n(?!\s*\n))*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_files() -> list[Path]:
    found = []
    for suffix in ("*.py", "*.md", "*.toml"):
        for path in ROOT.rglob(suffix):
            parts = path.relative_to(ROOT).parts
            if parts[0].startswith(".") or any(p in GENERATED for p in parts):
                continue
            if parts[0] not in TOP_FOLDERS and len(parts) > 1:
                continue  # virtual environments, build folders
            found.append(path)
    this_file = Path(__file__).resolve()  # its own checker test names dangling names on purpose
    return sorted(p for p in found if p != this_file)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 1, -1):
        module_name = ".".join(parts[:split])
        try:
            found = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            found = None
        if found is None:
            continue
        obj = importlib.import_module(module_name)
        for attribute in parts[split:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def _runnable(module_name: str) -> bool:
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        return False
    if spec.submodule_search_locations is None:  # a plain module file
        return True
    return importlib.util.find_spec(f"{module_name}.__main__") is not None


def _dangling(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    bad = [name for name in {m.group(0).rstrip(".") for m in _DOTTED.finditer(text)}]
    bad = [name for name in bad if not _resolves(name)]
    bad += [f"-m {m}" for m in {m.group(1) for m in _RUN_MODULE.finditer(text)} if not _runnable(m)]
    for named in {m.group(1) for m in _PATH.finditer(text)}:
        if named.split("/")[0] not in TOP_FOLDERS | ENGINE_WINGS:
            continue
        if not any((base / named).exists() for base in (ROOT, ROOT / "engine", path.parent)):
            bad.append(named)
    return sorted(bad)


def _anchor_slug(heading: str) -> str:
    """The id GitHub gives a heading: link syntax reduced to its text, lower case, every character
    but letters, digits, ``_``, ``-`` and spaces dropped, spaces turned into ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown text (outside code fences; repeats get -1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = None if in_fence else _HEADING.match(line)
        if heading is None:
            continue
        slug = _anchor_slug(heading.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative markdown links of ``path`` whose file is missing (or outside ``root``) or whose
    ``#anchor`` names no heading of the markdown file it points into."""
    text = path.read_text(encoding="utf-8")
    bad = []
    for target in sorted({m.group(1) for m in _LINK.finditer(text)}):
        if "://" in target or target.startswith("mailto:"):
            continue  # a web address: not resolved here (no network in the tests)
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path.resolve()
        missing = not linked.is_relative_to(root.resolve()) or not linked.exists()
        into_markdown = not missing and bool(anchor) and linked.suffix == ".md"
        if missing or (into_markdown and anchor not in _anchors(linked.read_text())):
            bad.append(target)
    return bad


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## The `block_offload` policy: K = 4 (issue 15)\n\n```\n# not a heading\n```\n"
        "## Again\n## Again\n[home](../README.md#top) [up](#page)\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n"
        "[ok](docs/page.md#the-block_offload-policy-k--4-issue-15) [ok](docs/page.md#again-1) "
        "[ok](#top) ![img](docs/page.md) [web](https://example.com/x#y)\n"
        "[gone](docs/missing.md) [no anchor](docs/page.md#not-a-heading) [bad](#nowhere) "
        "[outside](../elsewhere.md) [wrapped\nlink](docs/page.md#wrapped)\n"
    )
    assert _broken_links(readme, root=tmp_path) == [
        "#nowhere",
        "../elsewhere.md",
        "docs/missing.md",
        "docs/page.md#not-a-heading",
        "docs/page.md#wrapped",
    ]
    assert _broken_links(tmp_path / "docs" / "page.md", root=tmp_path) == []


@pytest.mark.parametrize(
    "path",
    [p for p in _prose_files() if p.suffix == ".md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_markdown_links_point_at_files_and_headings(path: Path) -> None:
    assert _broken_links(path) == [], f"{path.relative_to(ROOT)} links to what does not exist"


def test_the_checker_finds_dangling_names(tmp_path: Path) -> None:
    prose = tmp_path / "note.md"
    prose.write_text(
        "see e2ed2.engine.core.step_cuts.CutUnroll and e2ed2.engine.core.no_such_module, "
        "run `deepspeed --module e2ed2.engine.train` or `python -m e2ed2.engine.cli.train`, "
        "read engine/core/step_cuts.py and benchmarks/no_such_bench.py\n"
    )
    assert _dangling(prose) == [
        "-m e2ed2.engine.train",
        "benchmarks/no_such_bench.py",
        "e2ed2.engine.core.no_such_module",
    ]


@pytest.mark.parametrize("path", _prose_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_commands_and_files_exist(path: Path) -> None:
    assert _dangling(path) == [], f"{path.relative_to(ROOT)} names what does not exist"
