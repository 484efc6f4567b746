"""The README's layout section names only files and folders that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_every_file_in_the_readme_layout_exists() -> None:
    block = layout_block()
    folder = ROOT / "src" / "shoal"
    named: list[Path] = []
    current: Path | None = None  # the folder a line (and its continuation lines) describes
    for line in block.splitlines()[1:]:
        top = re.match(r"  (\w+)/", line)
        if top:
            current = folder / top.group(1)
        elif not line.startswith(" " * 16):
            current = None
        named += [(current or folder) / name for name in re.findall(r"\b(\w+\.py)\b", line)]
        named += [folder / name for name in re.findall(r"(?:^|\s)(\w+)/(?=\s|$)", line)]
    missing = [str(p.relative_to(ROOT)) for p in named if not p.exists()]
    assert named
    assert not missing, missing
