"""The README's code map names every module of the three packages, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pmc_pipeline", "rollout", "trainer")


def code_map_paths() -> set[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Code map\n\n```\n(.*?)```", text, flags=re.S)
    assert block, "README has no code map"
    paths, folder = set(), None
    for line in block.group(1).splitlines():
        name = line.split()[0]
        if not line.startswith(" "):
            folder = name.rstrip("/")
            paths.add(folder)
        else:
            paths.add(f"{folder}/{name.rstrip('/')}")
    return paths


def test_code_map_matches_the_tree():
    listed = code_map_paths()
    missing = sorted(p for p in listed if not (REPO / p).exists())
    assert not missing, f"the code map names what is not there: {missing}"
    modules = {f"{pkg}/{p.name}" for pkg in PACKAGES for p in (REPO / pkg).iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert len(modules) > 30
    unlisted = sorted(modules - listed)
    assert not unlisted, f"modules missing from the README's code map: {unlisted}"
