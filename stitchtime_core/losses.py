"""Losses shared by PTI and stitching tuning."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from stitchtime_core.errors import InputError
from stitchtime_core.models.torch_files import read_tensors_file


def build_lpips(*, net: str = "alex", backbone_path: str | os.PathLike | None = None) -> nn.Module:
    """LPIPS with the package's own linear weights, never downloading the backbone.

    Args:
        net: "alex" or "vgg".
        backbone_path: a torchvision state dict of the backbone (e.g. ``alexnet-owt-7be5be79.pth``).
            Without it the backbone keeps seeded random weights: still a deterministic feature
            distance, fine for the tiny profile and tests, not the published metric.

    Returns:
        a frozen module mapping two [batch, 3, H, W] images in [-1, 1] to [batch, 1, 1, 1] distances.
    """
    import lpips  # here, not at the top: it imports torchvision and torch._dynamo, 1.4 s of every start

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about lpips' `pretrained=` argument
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if backbone_path is not None:
        state = read_tensors_file(backbone_path, what=f"torchvision {net} weights")
        if not isinstance(state, dict) or not any(k.startswith("features.") for k in state):
            raise InputError(backbone_path, f"is not torchvision {net} weights (no features.* tensors)")
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        # lpips splits torchvision's `features` into slices that share the same submodules.
        layers = dict(model.net.named_modules())
        for key, value in features.items():
            index, param = key.split(".")
            owner = next((m for name, m in layers.items() if name.endswith(f".{index}") and hasattr(m, param)), None)
            if owner is None or getattr(owner, param).shape != value.shape:
                raise InputError(backbone_path, f"features.{key} does not fit LPIPS' {net} backbone")
            getattr(owner, param).data.copy_(value)
    return model.eval().requires_grad_(False)


def masked_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, *, kind: str = "l1") -> torch.Tensor:
    """Mean over all pixels of |a⊙m − b⊙m| (or its square): the paper's L1(s⊙b, x⊙b).

    Args:
        a, b: [batch, 3, H, W].
        mask: [batch, 1, H, W] or [1, 1, H, W] in [0, 1].
        kind: "l1" (the paper) or "l2" (the reference code).
    """
    diff = (a - b) * mask
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.square().mean()
    raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
