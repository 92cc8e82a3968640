"""The README's Layout section names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_modules() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    names: set[str] = set()
    folder = ""
    for line in block.splitlines()[1:]:
        m = re.match(r"^( +)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 2 and name.endswith("/"):
            folder = name
        elif indent == 2 and name.endswith(".py"):
            folder, _ = "", names.add(name)
        elif indent == 4 and name.endswith(".py"):
            names.add(folder + name)
    return names


def test_layout_lists_every_module() -> None:
    package = ROOT / "src" / "sinkscope"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    modules.add("__init__.py")
    listed = _layout_modules()
    assert sorted(modules - listed) == [], "modules missing from README's Layout"
    assert sorted(listed - modules) == [], "README's Layout names modules that do not exist"
