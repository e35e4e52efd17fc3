"""Pivotal tuning of ONE generator around the pivots of all frames (paper eq. 1).

min_θ 1/N Σ_i [LPIPS(c_i, r_i) + λ_L2·MSE(c_i, r_i)] + λ_R·L_R, with r_i = G(w_i; θ), and L_R PTI's
locality regulariser: at a code moved α from a pivot towards a random w of the original mapping
(ψ = 0.5), the tuned generator must still agree with the original one (MSE + LPIPS).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.config import PTIConfig
from stitchtime_core.models.stylegan2 import Generator


@dataclass
class PTIResult:
    generator: Generator
    """The tuned copy; the original generator is untouched."""
    losses: list[float]
    """Total loss of each step."""
    steps: int


def pti_steps(num_frames: int, config: PTIConfig) -> int:
    """Steps needed for every frame to be seen ``observations_per_frame`` times."""
    return math.ceil(num_frames * config.observations_per_frame / config.batch_size)


def locality_codes(G: Generator, pivots: torch.Tensor, *, alpha: float, psi: float,
                   generator: torch.Generator) -> torch.Tensor:
    """PTI's regulariser codes: each pivot moved a distance α towards a random w (truncated at ψ)."""
    z = torch.randn([pivots.shape[0], G.z_dim], generator=generator).to(pivots.device)
    w = G.mapping(z, truncation_psi=psi)
    direction = w - pivots
    norm = direction.flatten(1).norm(dim=1).clamp_min(1e-8).reshape(-1, 1, 1)
    return pivots + alpha * direction / norm


def tune_generator(G: Generator, pivots: torch.Tensor, crops: torch.Tensor, *, config: PTIConfig,
                   lpips_fn: nn.Module, progress: Callable[[int, int, float], None] | None = None) -> PTIResult:
    """Tune a copy of ``G`` so that G(pivots[i]) reproduces crops[i] for every frame.

    Args:
        G: the original generator (read only), on the device to train on.
        pivots: [frames, num_ws, w_dim] W+ pivots, on G's device.
        crops: [frames, 3, res, res] aligned crops in [-1, 1], on G's device.
        config: PTI settings; ``seed`` fixes the frame order and regulariser codes.
        lpips_fn: LPIPS module on G's device.
        progress: called with (step, total steps, loss) after each step.

    Returns:
        the tuned generator (eval mode, no gradients) and the loss of every step.
    """
    if pivots.shape[0] != crops.shape[0]:
        raise ValueError(f"{pivots.shape[0]} pivots for {crops.shape[0]} crops")
    res = G.img_resolution
    if crops.shape[1:] != (3, res, res):
        raise ValueError(f"crops must be [frames, 3, {res}, {res}], got {list(crops.shape)}")
    tuned = copy.deepcopy(G).train().requires_grad_(False)
    tuned.synthesis.requires_grad_(True)
    params = [p for p in tuned.synthesis.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    rng = torch.Generator().manual_seed(config.seed)
    num_frames = pivots.shape[0]
    total = pti_steps(num_frames, config)
    order = torch.cat([torch.randperm(num_frames, generator=rng)
                       for _ in range(math.ceil(total * config.batch_size / num_frames))])
    losses = []
    for step in range(total):
        index = order[step * config.batch_size:(step + 1) * config.batch_size].to(pivots.device)
        w, target = pivots[index], crops[index]
        image = tuned.synthesis(w, noise_mode="const")
        loss = (config.lambda_lpips * lpips_fn(image, target).mean()
                + config.lambda_l2 * F.mse_loss(image, target))
        if config.lambda_r > 0:
            codes = locality_codes(G, w, alpha=config.locality_alpha, psi=config.locality_psi, generator=rng)
            with torch.no_grad():
                original = G.synthesis(codes, noise_mode="const")
            moved = tuned.synthesis(codes, noise_mode="const")
            loss = loss + config.lambda_r * (F.mse_loss(moved, original) + lpips_fn(moved, original).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, total, losses[-1])
    return PTIResult(tuned.eval().requires_grad_(False), losses, total)
