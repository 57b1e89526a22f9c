"""The package's layout as docs/design.md states it: imports point up the module table only, no
module reaches into another's private names, nothing in the repository cites a file outside it."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spatlib"
DESIGN = ROOT / "docs" / "design.md"


def documented_order() -> list[str]:
    """The module table of docs/design.md, top (leaf) to bottom (command line)."""
    text = DESIGN.read_text()
    section = text.split("## Modules, in import order", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.M)


def spatlib_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported spatlib module, names taken from it) for every import in a module,
    at any depth (lazy imports inside functions count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module:                 # from .x import a, b
                out.append((node.lineno, node.module.split(".")[0], names))
            elif node.level == 1:                               # from . import x
                out += [(node.lineno, n, []) for n in names if n != "__version__"]
            elif node.module and node.module.split(".")[0] == "spatlib":
                parts = node.module.split(".")
                if len(parts) > 1:
                    out.append((node.lineno, parts[1], names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "spatlib" and len(parts) > 1:
                    out.append((node.lineno, parts[1], []))
    return out


def private_attribute_uses(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """``module._name`` where ``module`` is a spatlib module imported by name."""
    tree = ast.parse(path.read_text())
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module:
            bound |= {a.asname or a.name for a in node.names if a.name in modules}
        if isinstance(node, ast.ImportFrom) and node.module == "spatlib":
            bound |= {a.asname or a.name for a in node.names if a.name in modules}
    return [(n.lineno, f"{n.value.id}.{n.attr}") for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in bound and n.attr.startswith("_") and not n.attr.startswith("__")]


def test_design_lists_every_module_once():
    order = documented_order()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(order) == len(set(order)), f"listed twice: {order}"
    assert sorted(order) == modules, (f"docs/design.md lists {sorted(set(order) - set(modules))} "
                                      f"that do not exist and misses {sorted(set(modules) - set(order))}")


def test_imports_point_up_the_table_and_never_at_private_names():
    order = documented_order()
    rank = {m: i for i, m in enumerate(order)}
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        me = path.stem
        for line, other, names in spatlib_imports(path):
            if other not in rank:
                problems.append(f"{path.name}:{line} imports unknown module {other!r}")
            elif me != "__init__" and rank[other] >= rank[me]:
                problems.append(f"{path.name}:{line} imports {other} (listed at or below {me})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path.name}:{line} takes private {other}.{', '.join(private)}")
        for line, attr in private_attribute_uses(path, set(rank)):
            problems.append(f"{path.name}:{line} reaches into {attr}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_what_it_must_forbid(tmp_path):
    # the checks above are only worth something if they catch these: a downward import, a
    # lazy one inside a function, a private name taken, a private attribute reached
    bad = tmp_path / "bad.py"
    bad.write_text("from .train import _private\n"
                   "def f():\n    from spatlib.cli import main\n    from . import report\n"
                   "    return report._cache\n")
    found = spatlib_imports(bad)
    assert [(m, n) for _, m, n in found] == [("train", ["_private"]), ("cli", ["main"]), ("report", [])]
    assert private_attribute_uses(bad, {"report"}) == [(5, "report._cache")]


def test_nothing_in_the_repository_cites_a_file_outside_it():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    citing = [f for f in files if f != this and (ROOT / f).is_file()
              and re.search(r"DESIGN\.md|\.\./shared/STYLE|shared/DESIGN",
                            (ROOT / f).read_text(errors="ignore"))]
    assert not citing, f"files citing notes outside the repository: {citing}"
