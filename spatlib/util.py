"""The small helpers every layer shares: one home for each (the leaf of the import order).

Nothing here imports another spatlib module. What lives here:

* :class:`ConfigError` (re-exported by :mod:`spatlib.config`), :func:`did_you_mean` and
  :func:`check_choices`;
* a command line's :func:`comma_list` and :func:`progress_log`;
* :func:`derive_seed`: every random stream of the kit is seeded from (seed, tags) this way;
* :func:`resolve_device`, :func:`device_of`, :func:`device_name`;
* :func:`eval_mode`: eval mode for a block, every submodule's own flag restored after;
* :func:`atomic_write_bytes` / :func:`atomic_write_text`: a reader (or a killed process) sees
  the old file or the new one, never half of one;
* provenance: :func:`provenance`, the kit's one record of what produced a number (run
  folders, checkpoints, result cards, ``spat doctor`` and ``spat bench``; keys
  :data:`PROVENANCE_KEYS`), from :func:`utc_now`, :func:`git_commit`, :func:`spatlib_version`;
  :func:`sha256_file`, and :func:`code_fingerprint`: a hash of the code behind a number (its
  AST, not its text).
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import difflib
import functools
import hashlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range. The message names the key."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``" (did you mean 'lr'?)"`` for the closest option, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choices(key: str, values: Iterable[str], allowed: Iterable[str], what: str = "value") -> None:
    """A :class:`ConfigError` naming ``key`` at the first of ``values`` that is not one of
    ``allowed``: ``--models: unknown model 'resnet5' (did you mean 'resnet50'?); allowed: ...``."""
    allowed = [str(a) for a in allowed]
    for v in values:
        if v not in allowed:
            raise ConfigError(unknown_line(v, allowed, f"{key}: unknown {what} {v!r}", "allowed"))


def comma_list(text: str) -> list[str]:
    """A command line's comma-separated list: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def progress_log(quiet: bool = False) -> Callable[[str], None]:
    """A command's progress log: each line to stderr, flushed; nothing when ``quiet``."""
    if quiet:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)


def unknown_line(word: str, options: Iterable, head: str, label: str) -> str:
    """The one line for ``word`` that is not among ``options``: ``head``, the closest option
    and every option after ``label``, e.g. ``unknown key 'train.lrr' (did you mean 'lr'?);
    allowed keys under train: method, epochs, lr, ...``."""
    options = [str(o) for o in options]
    return f"{head}{did_you_mean(word, options)}; {label}: {', '.join(options)}"


def derive_seed(seed: int, *tags) -> int:
    """A stable 63-bit seed for one random stream, from a seed and tags (names or numbers):
    the same on every platform, process and Python run (no ``hash()``)."""
    text = ":".join([str(int(seed)), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------
# devices
def resolve_device(spec: str | torch.device = "auto", local_rank: int = 0,
                   key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU (decided at call time, never at import);
    ``cuda`` -> this process's GPU (``local_rank`` under torchrun); ``cpu``, ``cuda:N``, ``mps``.
    A device that is not there is a :class:`ConfigError` naming ``key``."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {spec!r} requested but CUDA is not available here; "
                          f"use 'auto' or 'cpu'")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: 'mps' requested but it is not available here; use 'auto' or 'cpu'")
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{key}: {spec!r} is not a device; expected auto, cpu, cuda, cuda:N "
                          f"or mps") from None


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters (or, without any, its buffers) live; CPU for an empty one."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:      # not on Linux
        return max(1, os.cpu_count() or 1)


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (x86_64)``: what provenance records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


@contextlib.contextmanager
def eval_mode(*models: nn.Module, train: bool = False) -> Iterator[None]:
    """Eval mode (or train mode with ``train=True``) inside the block; afterwards every
    submodule gets back its own flag, so a model in train mode with frozen BatchNorm stays so."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train)
        yield
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------------------------
# files
def atomic_write_bytes(path: str | Path, data: bytes | Callable[[BinaryIO], None], *,
                       fsync: bool = True) -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) through a temp file
    in the same folder, then ``os.replace``. ``fsync``: make it durable (checkpoints); caches
    that can be recomputed may skip it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        with contextlib.suppress(OSError):  # make the rename itself durable (not on every OS)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> None:
    """Temp files that a process killed while writing left behind (``NAME.tmp.PID``)."""
    for name in names:
        for p in Path(folder).glob(f"{name}.tmp.*"):
            with contextlib.suppress(OSError):
                p.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, hashed once per process for each (path, size, mtime): a checkpoint is
    hashed for the eval cache key and again for its card."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_out_path(out: str | Path | None, *, error: type[Exception] = ValueError) -> None:
    """``--out`` checked before any work: not a folder, and in a folder that exists or can be
    created, where a file can be created (a temporary one, removed; folders created for the
    check are removed too). None: the current folder (the default name is known later).
    Raises ``error`` (``spat eval``: TargetError, ``spat doctor``: ConfigError): ``--out PATH:
    why``, one line. The command-line tools call it before any work, so minutes of measuring
    are not lost to an unwritable path."""
    path = Path(out) if out is not None else None
    folder = path.parent if path is not None else Path(".")
    if path is not None and path.is_dir():
        raise error(f"--out {out}: a folder, not a file (give FILE.json)")
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise error(f"--out {out}: {folder} is a file, not a folder")
    created: list[Path] = []
    try:
        for f in reversed(missing):
            try:
                f.mkdir()
            except OSError as e:
                raise error(f"--out {out}: cannot create the folder {f} ({e.strerror})") from None
            created.append(f)
        where = created[-1] if created else folder
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".spat-out-"):
                pass
        except OSError as e:
            raise error(f"--out {out}: cannot create a file in {where} ({e.strerror})") from None
        if path is not None and path.exists() and not os.access(path, os.W_OK):
            raise error(f"--out {out}: exists and is not writable")
    finally:
        for f in reversed(created):
            f.rmdir()


# --------------------------------------------------------------------------------------------
# provenance
def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """HEAD of the repository that holds the spatlib package, or None; asked once per process
    (the code this process runs is what it imported: a checkpoint a run writes every epoch
    needs no git subprocess each time)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def spatlib_version() -> str:
    """The installed spatlib's version."""
    from . import __version__  # the package itself: no import cycle at call time
    return __version__


# the keys of every provenance record, in this order. Files of earlier releases lack some
# (metrics.json: cuda_version and date; cards: cuda_version and hostname; checkpoints: all but
# the two versions): a reader takes a missing key as unknown
PROVENANCE_KEYS = ("spatlib_version", "git_commit", "torch_version", "cuda_version", "device",
                   "device_name", "hostname", "date")


def provenance(device: torch.device) -> dict:
    """What produced a number, as :data:`PROVENANCE_KEYS`: the code (spatlib version, git
    commit), torch and the CUDA it was built for (None for a CPU build), the device (``cuda:0``)
    and its name (the GPU's, or ``cpu (x86_64)``), the host, and now (UTC). The one record that
    run folders (metrics.json, checkpoints), result cards and the device tools' machine blocks
    carry."""
    return {"spatlib_version": spatlib_version(), "git_commit": git_commit(),
            "torch_version": str(torch.__version__), "cuda_version": torch.version.cuda,
            "device": str(device), "device_name": device_name(device),
            "hostname": socket.gethostname(), "date": utc_now()}


# --------------------------------------------------------------------------------------------
# the code behind a number
PACKAGE_DIR = Path(__file__).resolve().parent


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    """``tree`` without the docstring of its module, classes and functions (in place)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _package_import(node: ast.ImportFrom) -> list[tuple[str, str, str | None]]:
    """(local name, spatlib module, its name or None for the module itself) per imported name."""
    if node.level == 1:
        if node.module is None:                              # from . import allocator
            return [(a.asname or a.name, a.name, None) for a in node.names]
        return [(a.asname or a.name, node.module.split(".")[0], a.name) for a in node.names]
    if node.level == 0 and node.module and node.module.startswith("spatlib."):
        return [(a.asname or a.name, node.module.split(".")[1], a.name) for a in node.names]
    return []


@dataclass
class _ModuleIndex:
    """One parsed module: its top-level statements by the name they define, the ones that
    define none (calls, ifs), and its imports of spatlib names."""
    defs: dict[str, list[ast.stmt]]
    other: list[ast.stmt]
    imports: dict[str, tuple[str, str | None]]

    @classmethod
    def parse(cls, path: Path) -> _ModuleIndex:
        tree = _strip_docstrings(ast.parse(path.read_text(), str(path)))
        index = cls({}, [], {})
        for st in tree.body:
            for node in ast.walk(st):
                if isinstance(node, ast.ImportFrom) and not isinstance(
                        st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    index.imports.update((local, (m, n)) for local, m, n in _package_import(node))
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [st.name]
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            else:
                names = []
            for name in names:
                index.defs.setdefault(name, []).append(st)
            if not names:
                index.other.append(st)
        return index

    def references(self, st: ast.stmt) -> set[tuple[str, str | None]]:
        """The (spatlib module, name) pairs a statement uses: this module's own top-level names,
        imported names (imports inside functions too), ``module.attribute`` of an imported
        module."""
        imports = dict(self.imports)
        for node in ast.walk(st):
            if isinstance(node, ast.ImportFrom):
                imports.update((local, (m, n)) for local, m, n in _package_import(node))
        out: set[tuple[str, str | None]] = set()
        for node in ast.walk(st):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and imports.get(node.value.id, ("", ""))[1] is None):
                out.add((imports[node.value.id][0], node.attr))
            elif isinstance(node, ast.Name):
                if node.id in imports and imports[node.id][1] is not None:
                    out.add(imports[node.id])
                elif node.id in self.defs:
                    out.add(("", node.id))                   # "": this module
        return out


def code_fingerprint(roots: Iterable[tuple[str, str | None]], *, skip: Iterable[str] = (),
                     package: str | Path | None = None) -> dict[str, str]:
    """A hash per spatlib module of the code that ``roots`` run: ``{"attacks.py": hex, ...}``.

    ``roots``: (module, top-level name) pairs, or (module, None) for a whole module. From them,
    every top-level definition they use is followed, in their module and through imports into
    other modules of ``package`` (default: this package) but those in ``skip``, so a module
    contributes only the definitions reached. Each one is hashed as its AST (``ast.dump``,
    docstrings removed): comments, docstrings and formatting change nothing; a changed
    constant, expression or call does. A cached number keyed by it is stale exactly when the
    code behind it changed.
    """
    package = Path(package) if package is not None else PACKAGE_DIR
    stamps = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                   for p in sorted(package.glob("*.py")))
    return dict(_fingerprint(str(package), tuple(roots), frozenset(skip), stamps))


@functools.lru_cache(maxsize=8)
def _fingerprint(package: str, roots: tuple, skip: frozenset,
                 stamps: tuple) -> tuple[tuple[str, str], ...]:
    """:func:`code_fingerprint`, memoized on the package's file stamps (``stamps``)."""
    modules: dict[str, _ModuleIndex] = {}
    reached: dict[str, dict[int, ast.stmt]] = {}
    todo, seen = list(roots), set()
    while todo:
        module, name = todo.pop()
        if (module, name) in seen or module in skip:
            continue
        seen.add((module, name))
        if module not in modules:
            modules[module] = _ModuleIndex.parse(Path(package) / f"{module}.py")
        index = modules[module]
        if name is None:
            stmts = [s for group in index.defs.values() for s in group] + index.other
        elif name in index.defs:
            stmts = index.defs[name]
        else:   # a name this module imports and others take from it (a re-export)
            stmts = []
            if name in index.imports:
                todo.append(index.imports[name])
        for st in stmts:
            reached.setdefault(module, {})[id(st)] = st
            todo += [(m or module, n) for m, n in index.references(st)]
    out = []
    for module in sorted(reached):
        h = hashlib.sha256()
        for st in sorted(reached[module].values(), key=lambda s: s.lineno):
            h.update(ast.dump(st).encode())
        out.append((f"{module}.py", h.hexdigest()[:16]))
    return tuple(out)
