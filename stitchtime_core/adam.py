"""Adam (Kingma & Ba 2015), as PTI, the projector and stitching tuning use it.

PTI and the projector use ``torch.optim.Adam`` (fused on CUDA); these helpers keep its state in a flat
form a PTI checkpoint can store. Stitching tuning uses :class:`BatchedAdam`: per-frame weights stacked
[frames, ...], each frame with its own moments, where a frame that stops early leaves the batch;
``torch.optim`` cannot drop rows of a parameter. Its update is ``torch.optim.Adam``'s (no weight decay,
no AMSGrad), the same numbers as its single-tensor path (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8
"""torch.optim.Adam's defaults, which the reference code uses."""


def adam_for(params: list[torch.Tensor], *, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the reference code's settings; fused on CUDA (one kernel for all tensors)."""
    return torch.optim.Adam(params, lr=lr, fused=True if params and params[0].is_cuda else None)


def adam_state(adam: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """Adam's moments and step count as flat tensors (safetensors can store them): ``exp_avg.K`` and
    ``exp_avg_sq.K`` of the K-th parameter (zeros for one that has had no gradient yet), and ``step``."""
    params = adam.param_groups[0]["params"]
    flat = {"step": torch.tensor(0.0)}
    for index, p in enumerate(params):
        state = adam.state.get(p, {})
        flat[f"exp_avg.{index}"] = state["exp_avg"].detach().clone() if state else torch.zeros_like(p)
        flat[f"exp_avg_sq.{index}"] = state["exp_avg_sq"].detach().clone() if state else torch.zeros_like(p)
        if state:
            flat["step"] = torch.tensor(float(state["step"]))
    return flat


def load_adam_state(adam: torch.optim.Adam, flat: dict[str, torch.Tensor]) -> None:
    """Go on from :func:`adam_state`.

    Raises:
        ValueError: the state is not of these parameters.
    """
    params = adam.param_groups[0]["params"]
    missing = [i for i in range(len(params)) if f"exp_avg.{i}" not in flat or f"exp_avg_sq.{i}" not in flat]
    if missing or "step" not in flat:
        raise ValueError(f"the optimiser state does not fit these parameters ({len(missing)} missing)")
    for index, p in enumerate(params):
        for key in (f"exp_avg.{index}", f"exp_avg_sq.{index}"):
            if flat[key].shape != p.shape:
                raise ValueError(f"the optimiser state does not fit these parameters ({key} is "
                                 f"{list(flat[key].shape)}, parameter {index} {list(p.shape)})")
        on_device = adam.defaults.get("fused") or adam.defaults.get("capturable")  # where torch keeps its step then
        adam.state[p] = {"step": torch.tensor(float(flat["step"]), dtype=torch.float32,
                                              device=p.device if on_device else "cpu"),
                         "exp_avg": flat[f"exp_avg.{index}"].to(p.device, p.dtype).clone(),
                         "exp_avg_sq": flat[f"exp_avg_sq.{index}"].to(p.device, p.dtype).clone()}


def adam_step(adam: torch.optim.Adam, loss: torch.Tensor) -> None:
    """One step on the gradients of ``loss`` with respect to the optimiser's own parameters only (no other
    tensor accumulates a gradient); a parameter ``loss`` does not use is left as it is."""
    params = adam.param_groups[0]["params"]
    for p, grad in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
        p.grad = grad
    adam.step()


class BatchedAdam:
    """Adam over stacked per-frame parameters [frames, ...]: one state per frame (the update is
    elementwise), with frames that can leave the batch (:meth:`keep`).

    Attributes:
        params: name -> tensor, updated in place by :meth:`step`.
        lr: the learning rate.
        steps: how many steps were taken.
    """

    def __init__(self, params: dict[str, torch.Tensor], *, lr: float):
        self.params, self.lr, self.steps = params, lr, 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    def step(self, grads: Sequence[torch.Tensor | None]) -> None:
        """One update from the gradients of :attr:`params`, in their order; a None leaves its tensor as it is."""
        self.steps += 1
        beta1, beta2 = BETAS
        correction1, correction2 = 1 - beta1 ** self.steps, (1 - beta2 ** self.steps) ** 0.5
        with torch.no_grad():
            for (name, p), g in zip(self.params.items(), grads, strict=True):
                if g is None:
                    continue
                self.exp_avg[name].lerp_(g, 1 - beta1)
                self.exp_avg_sq[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (self.exp_avg_sq[name].sqrt() / correction2).add_(EPS)
                p.addcdiv_(self.exp_avg[name], denom, value=-self.lr / correction1)

    def select(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of some frames (detached)."""
        return {k: p.detach()[rows] for k, p in self.params.items()}

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these frames only."""
        self.params = {k: p.detach()[rows].requires_grad_(True) for k, p in self.params.items()}
        self.exp_avg = {k: v[rows] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[rows] for k, v in self.exp_avg_sq.items()}
