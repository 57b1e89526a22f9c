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
    """The module table of docs/design.md, top (leaf) to bottom (command line); a module of a
    subpackage is named ``package.module``."""
    text = DESIGN.read_text()
    section = text.split("## Modules, in import order", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M)


def package_modules() -> dict[str, Path]:
    """Every module of the package by its table name (``train``, ``device.bench``)."""
    paths = [*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in sorted(paths) if p.stem != "__init__"}


def _table_name(parts: list[str]) -> str:
    """``device.bench`` for a module of a subpackage, ``train`` for a top-level one (a name
    taken from a module counts as the module)."""
    return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[0]).is_dir() else parts[0]


def spatlib_imports(path: Path, package: tuple[str, ...] = ()) -> list[tuple[int, str, list[str]]]:
    """(line, imported spatlib module, names taken from it) for every import in a module of
    the subpackage ``package`` (``()``: the top level), at any depth (lazy imports inside
    functions count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module.split(".") if node.module else []
            if node.level:                                      # from .x import a; from .. import x
                parts = list(package[:len(package) + 1 - node.level]) + module
            elif module[:1] == ["spatlib"]:
                parts = module[1:]
            else:
                continue
            if parts and not PACKAGE.joinpath(*parts).is_dir():
                out.append((node.lineno, _table_name(parts), names))
            else:                                               # from . import x: x is a module
                out += [(node.lineno, _table_name(parts + [n]), []) for n in names
                        if n != "__version__"]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "spatlib" and len(parts) > 1:
                    out.append((node.lineno, _table_name(parts[1:]), []))
    return out


def private_attribute_uses(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """``module._name`` where ``module`` is a spatlib module imported by name."""
    tree = ast.parse(path.read_text())
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and not node.module:
            bound |= {a.asname or a.name for a in node.names if a.name in modules}
        if isinstance(node, ast.ImportFrom) and node.module == "spatlib":
            bound |= {a.asname or a.name for a in node.names if a.name in modules}
    return [(n.lineno, f"{n.value.id}.{n.attr}") for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in bound and n.attr.startswith("_") and not n.attr.startswith("__")]


def test_design_lists_every_module_once():
    order = documented_order()
    modules = sorted(package_modules())
    assert len(order) == len(set(order)), f"listed twice: {order}"
    assert sorted(order) == modules, (f"docs/design.md lists {sorted(set(order) - set(modules))} "
                                      f"that do not exist and misses {sorted(set(modules) - set(order))}")


def test_imports_point_up_the_table_and_never_at_private_names():
    order = documented_order()
    rank = {m: i for i, m in enumerate(order)}
    problems = []
    for path in sorted([*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")]):
        package = path.relative_to(PACKAGE).parts[:-1]
        me, where = ".".join([*package, path.stem]), path.relative_to(PACKAGE).as_posix()
        for line, other, names in spatlib_imports(path, package):
            if other not in rank:
                problems.append(f"{where}:{line} imports unknown module {other!r}")
            elif path.stem != "__init__" and rank[other] >= rank[me]:
                problems.append(f"{where}:{line} imports {other} (listed at or below {me})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{where}:{line} takes private {other}.{', '.join(private)}")
        for line, attr in private_attribute_uses(path, {m.split(".")[-1] for m in rank}):
            problems.append(f"{where}:{line} reaches into {attr}")
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
    # in a subpackage: relative imports resolve to table names, one level up or in the package
    sub = tmp_path / "sub.py"
    sub.write_text("from ..cli import main\nfrom .bench import _cases\nfrom .. import runfolder as rf\n"
                   "from . import machine\nfrom spatlib.device.doctor import cli_main\nrf._x\n")
    found = spatlib_imports(sub, ("device",))
    assert [(m, n) for _, m, n in found] == [("cli", ["main"]), ("device.bench", ["_cases"]),
                                             ("runfolder", []), ("device.machine", []),
                                             ("device.doctor", ["cli_main"])]
    assert private_attribute_uses(sub, {"runfolder"}) == [(6, "rf._x")]


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
