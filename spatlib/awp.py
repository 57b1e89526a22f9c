"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020), for every adversarial
method of :mod:`spatlib.methods`.

One training step with AWP (``train.awp_gamma`` > 0), as the authors' code does it
(github.com/csdongxian/AWP: ``AT_AWP/utils_awp.py`` ``AdvWeightPerturb``,
``TRADES_AWP/utils_awp.py`` ``TradesAWP`` and the training loops that call them):

1. the attack crafts x_adv at the current weights w (the authors' order);
2. one ascent step of the method's own loss L (CE on x_adv for PGD-AT, CE + beta KL for TRADES,
   MART's loss, ...) at x_adv, the model in train mode: g = dL/dw;
3. each weight tensor with more than one dimension (convolution and linear weights; biases and
   BatchNorm parameters are never perturbed) moves by ``v = gamma ||w|| g / (||g|| + 1e-20)``:
   the step rescaled to gamma times the layer's norm;
4. the training loss, its gradients *and the optimizer step* are taken at w + v;
5. v is subtracted again: the weights end at ``w + v - update(w + v) - v``.

Step 5 follows the code, not the paper's prose: the authors restore after ``optimizer.step()``,
so SGD's weight decay and momentum see the perturbed weights (``lr * wd * v`` apart from a
restore before the step). The test in tests/test_awp.py checks one step against a line-for-line
re-implementation of the authors' classes.

Where the kit differs in form, not in value:

* the authors take the ascent step with a proxy copy of the model and an SGD optimizer
  (``lr`` 0.01 for AT-AWP, the training lr 0.1 for TRADES-AWP) and read the step back as
  ``w_proxy - w``. The lr cancels in the rescaling (``||w|| d / ||d||`` for ``d = lr g``), so
  the kit takes g itself with ``torch.autograd.grad``: no proxy model, no lr; the two agree to
  float rounding;
* the proxy's forward in train mode moves the *proxy's* BatchNorm statistics (reloaded from the
  model every step), never the model's; the kit runs the forward on the model and puts its
  buffers back afterwards, bit for bit;
* under torchrun the ascent gradients are summed over the processes before the rescaling
  (the authors' DataParallel computes them on the whole batch), so every process adds the same
  v and the replicas stay identical.

AWP keeps no state from one step to the next (the authors' proxy optimizer has no momentum), so
a resumed run needs nothing beyond the trainer's own checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["WeightPerturbation", "NORM_EPS"]

NORM_EPS = 1e-20    # the authors' EPS in ||w|| / (||d|| + EPS): a zero gradient gives v = 0


class WeightPerturbation:
    """AWP on ``model``: :meth:`perturb` moves the weights to w + v, :meth:`restore` moves them back.

    ``gamma``: the size of v relative to each layer's weight norm (the authors: 0.01 for AT-AWP,
    0.005 for TRADES-AWP). ``reduce``: called in place on the list of ascent gradients before the
    rescaling (the trainer sums them over torchrun's processes); None in a single process.
    """

    def __init__(self, model: nn.Module, gamma: float, *,
                 reduce: Callable[[list[Tensor]], None] | None = None):
        named = [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]
        if not gamma > 0:
            raise ValueError(f"WeightPerturbation: gamma must be > 0, got {gamma!r}")
        if not named:
            raise ValueError("WeightPerturbation: the model has no weight tensor with more than "
                             "one dimension to perturb")
        self.model, self.gamma, self.reduce = model, float(gamma), reduce
        self.names = [n for n, _ in named]              # what is perturbed, in model order
        self.weights = [p for _, p in named]

    def direction(self, loss_fn: Callable[[], Tensor]) -> list[Tensor]:
        """v for each perturbed weight (same shapes): the ascent gradient of ``loss_fn()`` (a
        closure computing the method's loss, a scalar, on the model as it is: train mode) rescaled
        to ``gamma * ||w||`` per tensor. The model's buffers (BatchNorm statistics) are put back
        as they were; its parameters and their ``.grad`` are not touched."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        grads = [torch.zeros_like(w) if g is None else g.detach() for w, g in zip(self.weights, grads)]
        if self.reduce is not None:
            self.reduce(grads)
        with torch.no_grad():
            out = []
            for w, g in zip(self.weights, grads):
                g_norm = g.norm()
                v = g * (self.gamma * w.norm() / (g_norm + NORM_EPS))
                # an overflowed fp16 ascent (inf in g) perturbs nothing, as GradScaler skips
                # the step whose gradients overflowed
                out.append(torch.where(torch.isfinite(g_norm), v, torch.zeros_like(v)))
            return out

    @torch.no_grad()
    def apply(self, v: list[Tensor], sign: float = 1.0) -> None:
        """w <- w + sign * v for each perturbed weight."""
        torch._foreach_add_(self.weights, v, alpha=sign)

    def perturb(self, loss_fn: Callable[[], Tensor]) -> list[Tensor]:
        """Compute v (:meth:`direction`), move the weights to w + v and return v (for
        :meth:`restore`)."""
        v = self.direction(loss_fn)
        self.apply(v, 1.0)
        return v

    def restore(self, v: list[Tensor]) -> None:
        """Subtract the perturbation :meth:`perturb` added (after the optimizer step)."""
        self.apply(v, -1.0)
