"""Adam (Kingma & Ba 2015), as PTI, the projector and stitching tuning use it.

It is ``torch.optim.Adam``'s update (no weight decay, no AMSGrad), the same numbers as its
single-tensor path, which is what it runs on a CPU. It is written here because ``torch.optim``
imports ``torch._dynamo`` the first time an optimiser is used: 1.5 s of every process that tunes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8
"""torch.optim.Adam's defaults, which the reference code uses."""


class Adam:
    """Adam over named tensors.

    Attributes:
        params: name -> tensor, updated in place by :meth:`step`.
        lr: the learning rate of the next step (the projector changes it as it goes).
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

    def state(self) -> dict[str, torch.Tensor]:
        """The moments and step count as flat tensors (safetensors can store them): ``exp_avg.K`` and
        ``exp_avg_sq.K`` for the K-th parameter, and ``step``."""
        flat = {"step": torch.tensor(float(self.steps))}
        for index, name in enumerate(self.params):
            flat[f"exp_avg.{index}"] = self.exp_avg[name].detach().clone()
            flat[f"exp_avg_sq.{index}"] = self.exp_avg_sq[name].detach().clone()
        return flat

    def load_state(self, flat: dict[str, torch.Tensor]) -> None:
        """Go on from :meth:`state`.

        Raises:
            ValueError: the state is not of these parameters.
        """
        names = list(self.params)
        missing = [i for i in range(len(names)) if f"exp_avg.{i}" not in flat or f"exp_avg_sq.{i}" not in flat]
        if missing or "step" not in flat:
            raise ValueError(f"the optimiser state does not fit these parameters ({len(missing)} missing)")
        for index, name in enumerate(names):
            for moments, key in ((self.exp_avg, f"exp_avg.{index}"), (self.exp_avg_sq, f"exp_avg_sq.{index}")):
                if flat[key].shape != self.params[name].shape:
                    raise ValueError(f"the optimiser state does not fit these parameters ({key} is "
                                     f"{list(flat[key].shape)}, {name} {list(self.params[name].shape)})")
                moments[name] = flat[key].to(self.params[name].device, self.params[name].dtype).clone()
        self.steps = int(flat["step"])
