"""The package's layout as docs/design.md states it: imports point up the module table only, no
module reaches into another's private names, nothing in the repository cites a file outside it.

A module of a subpackage has its own row, named by its dotted path below ``spatlib``
(``launch.plan``), and a subpackage's rows stand together. Importing the subpackage itself
(``from spatlib import launch``, ``from spatlib.launch import run_batch``) runs its ``__init__``,
which imports its modules: that counts as an import of the package's last row."""
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
    return re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``spatlib/launch/plan.py`` -> ``launch.plan``; a package's ``__init__.py`` -> its name
    (``launch``; ``""`` for spatlib's own)."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module and subpackage of the package by :func:`module_name`."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _import_targets(node: ast.AST, here: list[str],
                    known: set[str]) -> list[tuple[str, list[str], dict[str, str]]]:
    """(module, names taken from it, {bound name: module} for modules bound by name) of one
    import statement in a module of the package ``here`` (``[]``: spatlib, ``["launch"]``)."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "spatlib" and len(parts) > 1:
                mod = ".".join(parts[1:])
                out.append((mod, [], {a.asname: mod} if a.asname else {}))
        return out
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        if node.level - 1 > len(here):
            return []                                           # above spatlib: not ours
        target = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == "spatlib":
        target = node.module.split(".")[1:]
    else:
        return []
    out, taken = [], []
    for a in node.names:
        sub = ".".join(target + [a.name])
        if sub in known or not target:                          # from . import report
            if a.name != "__version__":
                out.append((sub, [], {a.asname or a.name: sub}))
        else:                                                   # from .plan import Job
            taken.append(a.name)
    if taken:
        out.append((".".join(target), taken, {}))
    return out


def _walk_imports(path: Path, known: set[str], package: Path):
    me = module_name(path, package)
    here = [p for p in (me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]) if p]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for mod, names, bound in _import_targets(node, here, known):
            yield node.lineno, mod, names, bound


def spatlib_imports(path: Path, known: set[str], package: Path = PACKAGE) -> list[tuple[int, str, list[str]]]:
    """(line, imported spatlib module or subpackage, names taken from it) for every import in a
    module, at any depth (lazy imports inside functions count too). ``known``: the package's
    module names; ``from .pkg import mod`` names the module ``pkg.mod`` when it is one."""
    return [(line, mod, names) for line, mod, names, _ in _walk_imports(path, known, package)]


def private_attribute_uses(path: Path, known: set[str], package: Path = PACKAGE) -> list[tuple[int, str]]:
    """``module._name`` where ``module`` is a spatlib module bound by name (``from . import x``,
    ``from spatlib import x``, ``from spatlib.launch import plan``)."""
    bound = {}
    for _, _, _, names in _walk_imports(path, known, package):
        bound.update(names)
    return [(n.lineno, f"{n.value.id}.{n.attr}") for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in bound and n.attr.startswith("_") and not n.attr.startswith("__")]


def ranks(order: list[str]) -> dict[str, float]:
    """Row of each module in the table; a subpackage (its ``__init__``) ranks just below its
    last module, since it imports them all."""
    rank: dict[str, float] = {m: i for i, m in enumerate(order)}
    for i, m in enumerate(order):
        parts = m.split(".")
        for k in range(1, len(parts)):
            rank[".".join(parts[:k])] = i + 0.5
    return rank


def import_problems(package: Path, order: list[str]) -> list[str]:
    """Every import that points down the table (or at its own row), at an unknown module, or
    at a private name."""
    rank = ranks(order)
    known = set(package_modules(package))
    problems = []
    for me, path in package_modules(package).items():
        where = path.relative_to(package).as_posix()
        if me and me not in rank:
            problems.append(f"{where}: not in the table")
            continue
        for line, other, names in spatlib_imports(path, known, package):
            if other not in rank:
                problems.append(f"{where}:{line} imports unknown module {other!r}")
            elif me and rank[other] >= rank[me]:
                problems.append(f"{where}:{line} imports {other} (listed at or below {me})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{where}:{line} takes private {other}.{', '.join(private)}")
        for line, attr in private_attribute_uses(path, known, package):
            problems.append(f"{where}:{line} reaches into {attr}")
    return problems


def test_design_lists_every_module_once_and_a_subpackage_in_one_block():
    order = documented_order()
    modules = sorted(m for m, p in package_modules().items() if p.name != "__init__.py")
    assert len(order) == len(set(order)), f"listed twice: {order}"
    assert sorted(order) == modules, (f"docs/design.md lists {sorted(set(order) - set(modules))} "
                                      f"that do not exist and misses {sorted(set(modules) - set(order))}")
    packages = [m.rsplit(".", 1)[0] if "." in m else None for m in order]
    for pkg in {p for p in packages if p}:
        rows = [i for i, p in enumerate(packages) if p == pkg]
        assert rows == list(range(rows[0], rows[-1] + 1)), f"the rows of {pkg}.* are not together: {rows}"


def test_imports_point_up_the_table_and_never_at_private_names():
    problems = import_problems(PACKAGE, documented_order())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_what_it_must_forbid(tmp_path):
    # the checks above are only worth something if they catch these: a downward import, a
    # lazy one inside a function, a private name taken, a private attribute reached, and the
    # same inside a subpackage (relative imports one and two levels up, the package itself)
    pkg = tmp_path / "spatlib"
    (pkg / "launch").mkdir(parents=True)
    for name in ("__init__", "train", "report", "cli", "launch/plan"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "launch" / "__init__.py").write_text("from .plan import run\n")
    bad = pkg / "bad.py"
    bad.write_text("from .train import _private\n"
                   "def f():\n    from spatlib.cli import main\n    from . import report\n"
                   "    return report._cache\n")
    known = set(package_modules(pkg))
    found = spatlib_imports(bad, known, pkg)
    assert [(m, n) for _, m, n in found] == [("train", ["_private"]), ("cli", ["main"]), ("report", [])]
    assert private_attribute_uses(bad, known, pkg) == [(5, "report._cache")]
    (pkg / "launch" / "local.py").write_text("from .plan import Job\nfrom ..report import table\n"
                                             "from .. import cli\nfrom spatlib.launch import plan\n"
                                             "plan._x\n")
    found = spatlib_imports(pkg / "launch" / "local.py", known | {"launch.local"}, pkg)
    assert [(m, n) for _, m, n in found] == [("launch.plan", ["Job"]), ("report", ["table"]),
                                             ("cli", []), ("launch.plan", [])]
    bad.unlink()
    order = ["train", "report", "launch.plan", "launch.local", "cli"]
    problems = import_problems(pkg, order)
    assert problems == ["launch/local.py:3 imports cli (listed at or below launch.local)",
                        "launch/local.py:5 reaches into plan._x"]
    # a module of the package that imports its package, or one below it in the table
    (pkg / "launch" / "plan.py").write_text("from . import local\nfrom spatlib import launch\n")
    assert [p for p in import_problems(pkg, order) if p.startswith("launch/plan.py")] == [
        "launch/plan.py:1 imports launch.local (listed at or below launch.plan)",
        "launch/plan.py:2 imports launch (listed at or below launch.plan)"]


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
