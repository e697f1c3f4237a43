"""The README's code map names every module and subpackage of the three packages, and nothing that
is not there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pmc_pipeline", "rollout", "trainer")


def code_map_paths() -> set[str]:
    """Paths in the code map; two spaces of indent per folder level."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Code map\n\n```\n(.*?)```", text, flags=re.S)
    assert block, "README has no code map"
    paths, folders = set(), []
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0].rstrip("/")
        folders = folders[:depth]
        path = "/".join([*folders, name])
        paths.add(path)
        if line.split()[0].endswith("/"):
            folders.append(name)
    return paths


def tree_modules() -> set[str]:
    """Every module (but __init__) and subpackage under the three packages, and each package's data folders."""
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            relative = path.relative_to(REPO)
            if "__pycache__" in relative.parts:
                continue
            if (path.suffix == ".py" and path.name != "__init__.py") or path.is_dir():
                found.add(str(relative))
    return found


def test_code_map_matches_the_tree():
    listed = code_map_paths()
    missing = sorted(p for p in listed if not (REPO / p).exists())
    assert not missing, f"the code map names what is not there: {missing}"
    modules = tree_modules()
    assert len(modules) > 40
    # a benchmark section is listed as its folder; its modules need no line each
    unlisted = sorted(m for m in modules - listed if not m.startswith("pmc_pipeline/bench/"))
    assert not unlisted, f"missing from the README's code map: {unlisted}"
