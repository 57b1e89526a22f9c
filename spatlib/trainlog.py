"""What a run shows while it trains: progress bars, one line per epoch, TensorBoard events.

tqdm bars show on a terminal and in a Jupyter kernel (as widgets); wherever no bar shows, and
in a kernel too (papermill's ``--log-output`` log of a batch gets it), one line per epoch goes
to stderr (:func:`epoch_line`, :func:`show_epoch`): :func:`display_mode` makes that choice. With
``train.tensorboard`` the history's columns are also TensorBoard events in the run folder
(:func:`tensorboard_writer`, :func:`write_scalars`). Nothing here changes what is trained.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

__all__ = ["TENSORBOARD_DIR", "NoBar", "progress_bar", "in_jupyter_kernel", "display_mode",
           "epoch_line", "show_epoch", "tensorboard_writer", "write_scalars"]

TENSORBOARD_DIR = "tensorboard"   # train.tensorboard: the event files' folder in the run folder


class NoBar:
    """A progress bar that shows nothing (tqdm's interface)."""

    def __init__(self, *args, **kwargs): pass
    def update(self, n: int = 1) -> None: pass
    def set_postfix(self, *args, **kwargs) -> None: pass
    def close(self) -> None: pass


def progress_bar(enabled: bool) -> Callable[..., Any]:
    """The bar class: ``tqdm.auto.tqdm`` (a widget in a kernel) when ``enabled``, else
    :class:`NoBar`."""
    if not enabled:
        return NoBar
    from tqdm.auto import tqdm
    return tqdm


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where tqdm.auto draws widgets."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def display_mode(progress: bool | None, enabled: bool, main: bool) -> tuple[bool, bool]:
    """(bars, epoch lines) of a run. ``progress``: True/False forces the bars on or off, None
    shows them on a terminal and in a Jupyter kernel; ``enabled``: ``train.progress`` (false
    hides them always); ``main``: this process writes (rank 0). Lines go wherever no bar shows,
    and in a kernel too."""
    in_kernel = in_jupyter_kernel()
    bars = progress if progress is not None else (sys.stderr.isatty() or in_kernel)
    show = bool(enabled and main and bars)
    return show, main and (not show or in_kernel)


def _acc(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def epoch_line(row: dict, epochs: int, name: str = "") -> str:
    """The one line per epoch printed where no progress bar shows (logs, batches, kernels):
    ``run: epoch 3/15: loss 0.8123, train clean/adv acc 0.912/0.553, val clean/robust acc
    0.933/0.587, shared share 0.301 (PGD 0.185), 12.3 s``; ``-`` where the epoch did not measure
    a value (no attack, no validation that epoch), no shared share where no check ran."""
    head = f"{name}: " if name else ""
    share = row.get("shared_share", math.nan)
    check = ("" if share is None or math.isnan(share) else
             f", shared share {share:.3f} (PGD {_acc(row.get('shared_share_pgd', math.nan))})")
    return (f"{head}epoch {int(row['epoch'])}/{epochs}: loss {row['train_loss']:.4f}, "
            f"train clean/adv acc {_acc(row['train_clean_acc'])}/{_acc(row['train_adv_acc'])}, "
            f"val clean/robust acc {_acc(row.get('val_clean_acc', math.nan))}/"
            f"{_acc(row.get('val_robust_acc', math.nan))}{check}, {row['epoch_time_s']:.1f} s")


def show_epoch(bar, row: dict, epochs: int, name: str, line: bool) -> None:
    """After an epoch's checkpoint: the epochs ``bar`` one step on, with the epoch's loss and
    validation accuracies, and with ``line`` the :func:`epoch_line` of ``row`` on stderr."""
    bar.update(1)
    bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_clean_acc", "val_robust_acc")
                     if not math.isnan(row[k])})
    if line:
        print(epoch_line(row, epochs, name), file=sys.stderr, flush=True)


def tensorboard_writer(run_dir: Path, epoch: int):
    """A SummaryWriter on ``run_dir/tensorboard`` for a session that trains from ``epoch``
    (completed epochs, 0-based) on.

    Its ``purge_step`` is the first epoch this session trains: a run killed after an epoch's
    events were written but before its checkpoint retrains that epoch, and TensorBoard drops
    the stale events from that step on, so every epoch has one value per column."""
    from torch.utils.tensorboard import SummaryWriter   # the optional extra, checked at setup
    return SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=epoch + 1)


def write_scalars(writer, row: dict, columns: Sequence[str]) -> None:
    """One scalar per numeric history column at step = the epoch (1-based), as history.csv
    has it; a NaN (no validation that epoch) is left out, as TensorBoard cannot draw it."""
    for c in columns:
        v = row.get(c)
        if c != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
            writer.add_scalar(c, v, global_step=int(row["epoch"]))
    writer.flush()
