"""Losses shared by PTI and stitching tuning."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from stitchtime_core.errors import InputError, StitchtimeError
from stitchtime_core.models.torch_files import read_tensors_file

_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
"""LPIPS v0.1's input scaling (ImageNet statistics in [-1, 1])."""
_CHANNELS = (64, 192, 384, 256, 256)
_LAYER_ENDS = (2, 5, 8, 10, 12)
"""Where each of LPIPS' five layers ends in AlexNet's ``features``: after relu1 ... relu5."""


class LPIPS(nn.Module):
    """LPIPS v0.1 on AlexNet (Zhang et al. 2018), as the ``lpips`` package's ``LPIPS(net="alex")`` computes it.

    ``features`` is laid out as torchvision's ``alexnet().features`` (the same indices, so its weights
    file loads as is); ``lins`` are the five calibrated 1x1 layers. Build it with :func:`build_lpips`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in _CHANNELS)

    def layers(self, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's share of the distance: five [batch, 1, 1, 1] tensors (see :meth:`forward`).

        The operations come in the ``lpips`` package's order, so that gradients match it bit for bit too.
        """
        diffs = [(_unit(x) - _unit(y)) ** 2 for x, y in zip(self._activations(a), self._activations(b))]
        return [lin(diff).mean([2, 3], keepdim=True) for lin, diff in zip(self.lins, diffs)]

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out, start = (x - self.shift) / self.scale, [], 0
        for end in _LAYER_ENDS:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The distance of two [batch, 3, H, W] images in [-1, 1]: [batch, 1, 1, 1]."""
        return sum(self.layers(a, b))


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Each position's feature vector scaled to unit length (LPIPS' ``normalize_tensor``, in its operations)."""
    return features / (torch.sqrt(torch.sum(features ** 2, dim=1, keepdim=True)) + 1e-10)


def build_lpips(*, backbone_path: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS with the ``lpips`` package's calibrated linear weights, never downloading the backbone.

    Args:
        backbone_path: torchvision's AlexNet state dict (``alexnet-owt-7be5be79.pth``). Without it the
            backbone keeps seeded random weights, the very ones ``lpips.LPIPS(net="alex", pnet_rand=True)``
            draws after ``torch.manual_seed(0)``: still a deterministic feature distance, fine for the tiny
            profile and tests, not the published metric.

    Returns:
        a frozen :class:`LPIPS` in eval mode, on the CPU.

    Raises:
        InputError: the backbone file is not torchvision AlexNet weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LPIPS()
    model.lins.load_state_dict(_linear_weights())
    if backbone_path is not None:
        state = read_tensors_file(backbone_path, what="torchvision alex weights")
        if not isinstance(state, dict) or not any(k.startswith("features.") for k in state):
            raise InputError(backbone_path, "is not torchvision alex weights (no features.* tensors)")
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        try:
            model.features.load_state_dict(features)
        except RuntimeError as exc:
            problem = str(exc).splitlines()[-1].strip() if str(exc).strip() else "wrong keys or shapes"
            raise InputError(backbone_path, f"does not fit LPIPS' alex backbone ({problem})") from None
    return model.eval().requires_grad_(False)


def _linear_weights() -> dict[str, torch.Tensor]:
    """The ``lpips`` package's calibrated AlexNet linear layers, found without importing the package
    (which imports torchvision: seconds of every start), as ``lins`` state dict keys."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise StitchtimeError("the lpips package is not installed; it holds LPIPS' linear weights "
                              "(pip install lpips)")
    path = Path(spec.submodule_search_locations[0], "weights", "v0.1", "alex.pth")
    state = read_tensors_file(path, what="LPIPS' alex linear weights")
    return {f"{k.removeprefix('lin').split('.')[0]}.weight": v for k, v in state.items()}


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
