"""Adam (Kingma & Ba 2015), as PTI, the projector and stitching tuning use it.

All three use ``torch.optim.Adam`` (fused on CUDA). PTI checkpoints keep its state in a flat form
(:func:`adam_state`). Stitching tuning stacks per-frame weights [frames, ...], each frame with its own
moments (the update is elementwise); a frame that stops early leaves the batch (:func:`keep_rows`).
Measured against the hand-written batched Adam this replaced (0.3-2.1 M parameters, 1-8 frames, CPU):
1.7-3.9 ms per step either way, under 1 % of a stitching step.
"""

from __future__ import annotations

import torch

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


def keep_rows(adam: torch.optim.Adam, rows: torch.Tensor) -> torch.optim.Adam:
    """Go on with some rows of stacked per-frame parameters [frames, ...]: a new ``torch.optim.Adam`` over
    those rows, with their moments and the step count (the update is elementwise, so each frame's rows
    go on exactly as if it had always been alone). ``torch.optim`` cannot drop rows of a parameter."""
    old = adam.param_groups[0]["params"]
    new = [p.detach()[rows].requires_grad_(True) for p in old]
    kept = adam_for(new, lr=adam.param_groups[0]["lr"])
    for p, q in zip(old, new, strict=True):
        if p in adam.state:
            state = adam.state[p]
            kept.state[q] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][rows],
                             "exp_avg_sq": state["exp_avg_sq"][rows]}
    return kept
