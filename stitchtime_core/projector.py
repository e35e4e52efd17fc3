"""W pivots by optimisation: the PTI / stylegan2-ada projector, the paper's "w/o e4e" ablation.

Each frame gets one w, searched from the average latent with Adam, and its own noise maps, optimised
alongside it and kept white by a multi-scale autocorrelation penalty (stylegan2-ada-pytorch's
``projector.project``, which PTI's ``w_projector`` runs with lr 5e-3 for 450 steps). Two departures
from the reference: the perceptual distance is our LPIPS module instead of NVIDIA's VGG16 file, and
frames are projected in batches, each frame with its own w, noise maps and random draws, so a frame's
pivot does not depend on the other frames of its batch (beyond float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.adam import adam_for, adam_step
from stitchtime_core.config import EncodingConfig
from stitchtime_core.models.stylegan2 import Generator

# Schedule constants of stylegan2-ada-pytorch's projector.project (PTI keeps them unchanged).
INITIAL_NOISE_FACTOR = 0.05
"""Std of the noise added to w at step 0, relative to the std of W."""
NOISE_RAMP_LENGTH = 0.75
"""Fraction of the steps over which that noise decays (quadratically) to zero."""
LR_RAMPUP_LENGTH = 0.05
"""Fraction of the steps over which the learning rate rises linearly from 0."""
LR_RAMPDOWN_LENGTH = 0.25
"""Fraction of the steps at the end over which the learning rate falls to 0 (half cosine)."""
W_AVG_SAMPLES = 10_000
"""z samples through the mapping network for the mean and std of W (reference: 10000)."""
W_STATS_SEED = 123
"""Fixed seed of those samples (the reference's ``RandomState(123)``): every run starts from one w_avg."""
LOSS_RESOLUTION = 256
"""Images larger than this are area-downsampled before the perceptual distance, as in the reference."""


def w_statistics(G: Generator, *, samples: int = W_AVG_SAMPLES) -> tuple[torch.Tensor, float]:
    """Mean and spread of W from ``samples`` seeded z through the mapping network.

    Returns:
        w_avg [w_dim] on G's device, and w_std: the root mean squared distance of a w from w_avg.
    """
    z = torch.randn([samples, G.z_dim], generator=torch.Generator().manual_seed(W_STATS_SEED))
    device = next(G.parameters()).device
    with torch.no_grad():
        # In chunks: the mapping repeats each w num_ws times (18 x 512 floats per sample at 1024 px).
        w = torch.cat([G.mapping(chunk.to(device))[:, 0] for chunk in z.split(1000)])
    w_avg = w.mean(dim=0)
    w_std = float((w - w_avg).square().sum(dim=1).mean().sqrt())
    return w_avg, w_std


def learning_rate(t: float, peak: float) -> float:
    """The reference's schedule at progress ``t`` in [0, 1): linear ramp up, cosine ramp down."""
    ramp = min(1.0, (1.0 - t) / LR_RAMPDOWN_LENGTH)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return peak * ramp * min(1.0, t / LR_RAMPUP_LENGTH)


def noise_regularization(noise_maps: list[torch.Tensor]) -> torch.Tensor:
    """Squared autocorrelation of each noise map with its 1-pixel shifts, at every scale down to 8 px.

    Args:
        noise_maps: tensors [batch, H, W], one per noise input.

    Returns:
        [batch], the penalty of each frame (0 for white noise).
    """
    total = 0.0
    for maps in noise_maps:
        x = maps.unsqueeze(1)  # [batch, 1, H, W] for avg_pool2d
        while True:
            for dim in (2, 3):
                total = total + (x * x.roll(shifts=1, dims=dim)).mean(dim=(1, 2, 3)).square()
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return total


def _frame_generator(seed: int, frame: int) -> torch.Generator:
    """An independent CPU stream per (seed, frame): a frame's draws do not depend on its batch."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, frame]).generate_state(1)[0]))


def _normalize_(noise: dict[str, torch.Tensor]) -> None:
    """Zero mean and unit variance per frame and map, in place."""
    for maps in noise.values():
        maps -= maps.mean(dim=(1, 2), keepdim=True)
        maps *= maps.square().mean(dim=(1, 2), keepdim=True).rsqrt()


def project_pivots(G: Generator, crops: torch.Tensor, *, config: EncodingConfig, lpips_fn: nn.Module,
                   seed: int = 0, w_avg_samples: int = W_AVG_SAMPLES, start: torch.Tensor | None = None,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """W+ pivots of aligned crops by per-frame optimisation of w (the alternative to e4e encoding).

    Args:
        G: the original generator (read only: its buffers are never written), on the device to use.
        crops: [frames, 3, res, res] aligned crops in [-1, 1], on G's device; res is G's resolution.
        config: ``batch_size``, ``projection_steps``, ``projection_lr``, ``projection_noise_weight`` and
            ``warm_start_steps`` (0: each frame from the average latent, ``batch_size`` frames at once;
            N: frames in order, each from its predecessor's solution, N steps after the first).
        lpips_fn: LPIPS on G's device, mapping two [batch, 3, H, W] images in [-1, 1] to [batch, 1, 1, 1].
        seed: seeds each frame's noise maps and w noise (frame i's draws depend on seed and i only).
        w_avg_samples: z samples for the mean and spread of W.
        start: [w_dim], with warm starts: the w of the frame before ``crops[0]`` (a previous call's last
            pivot), so that the first frame too starts warm.
        progress: called with (step, total steps) after each step.

    Returns:
        pivots [frames, num_ws, w_dim]: each frame's w repeated over num_ws, detached.

    Raises:
        ValueError: crops of the wrong shape or device, or a conditional generator.
    """
    res = G.img_resolution
    if crops.ndim != 4 or crops.shape[1:] != (G.img_channels, res, res):
        raise ValueError(f"crops must be [frames, {G.img_channels}, {res}, {res}], got {list(crops.shape)}")
    device = next(G.parameters()).device
    if crops.device != device:
        raise ValueError(f"crops are on {crops.device}, the generator on {device}")
    if G.c_dim > 0:
        raise ValueError(f"only unconditional generators can be projected (c_dim is {G.c_dim})")
    frames = crops.shape[0]
    if frames == 0:
        return crops.new_zeros([0, G.num_ws, G.w_dim])
    w_avg, w_std = w_statistics(G, samples=w_avg_samples)
    plan = projection_plan(frames, config, warm=start is not None)
    total, done = sum(steps for _, steps in plan), 0
    pivots, previous = [], None if start is None else (start.reshape(1, -1).to(device), None)
    for frame_ids, steps in plan:
        on_step = None if progress is None else (lambda step, done=done: progress(done + step, total))
        w, noise = _project_batch(G, crops[frame_ids.start:frame_ids.stop], frame_ids, steps=steps, w_avg=w_avg,
                                  w_std=w_std, config=config, lpips_fn=lpips_fn, seed=seed, on_step=on_step,
                                  warm_from=previous if config.warm_start_steps else None)
        pivots.append(w)
        previous, done = (w, noise), done + steps
    return torch.cat(pivots).unsqueeze(1).repeat([1, G.num_ws, 1])


def projection_plan(frames: int, config: EncodingConfig, *, warm: bool = False) -> list[tuple[range, int]]:
    """The projector's batches of frames, each with its number of steps.

    Without warm starts: ``batch_size`` frames at a time, ``projection_steps`` each. With them: one
    frame at a time, ``projection_steps`` for the first (unless ``warm``: it follows an earlier call's
    last frame) and ``warm_start_steps`` for every next one.
    """
    if not config.warm_start_steps:
        return [(range(start, min(start + config.batch_size, frames)), config.projection_steps)
                for start in range(0, frames, config.batch_size)]
    return [(range(i, i + 1), config.warm_start_steps if i or warm else config.projection_steps)
            for i in range(frames)]


def _project_batch(G: Generator, targets: torch.Tensor, frame_ids: range, *, steps: int, w_avg: torch.Tensor,
                   w_std: float, config: EncodingConfig, lpips_fn: nn.Module, seed: int,
                   on_step: Callable[[int], None] | None,
                   warm_from: tuple[torch.Tensor, dict[str, torch.Tensor] | None] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Optimise one w and one set of noise maps per target.

    ``warm_from``: (w [1, w_dim], noise maps or None) of the previous frame to start from, without the
    initial w noise; otherwise each target starts from the average latent with fresh noise maps.

    Returns:
        w [batch, w_dim] and the noise maps (each [batch, H, W]), detached.
    """
    batch, device = targets.shape[0], targets.device
    synthesis = G.synthesis
    noise_names = [name for name, _ in synthesis.named_buffers() if name.endswith("noise_const")]
    # The generator's own tensors, shared by all frames; detached so that no gradient reaches them.
    shared = {name: t.detach() for name, t in [*synthesis.named_parameters(), *synthesis.named_buffers()]
              if name not in noise_names}

    # Each frame's random draws come from its own stream: noise maps first, then w noise of every step.
    streams = [_frame_generator(seed, i) for i in frame_ids]
    noise = {name: torch.stack([torch.randn(synthesis.get_buffer(name).shape, generator=g) for g in streams]).to(device)
             for name in noise_names}  # each [batch, H, W]
    w_noise = torch.stack([torch.randn([steps, G.w_dim], generator=g) for g in streams]).to(device)
    initial_noise = INITIAL_NOISE_FACTOR
    w = w_avg.detach().unsqueeze(0).repeat([batch, 1])  # [batch, w_dim]
    if warm_from is not None:
        w, initial_noise = warm_from[0].detach().expand(batch, -1), 0.0
        noise = {k: v.detach().expand(batch, -1, -1) for k, v in warm_from[1].items()} if warm_from[1] else noise
    noise = {k: v.clone() for k, v in noise.items()}
    _normalize_(noise)
    for maps in noise.values():
        maps.requires_grad_(True)
    w = w.clone().requires_grad_(True)
    adam = adam_for([w, *noise.values()], lr=config.projection_lr)

    def render(frame_noise: dict[str, torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
        # One frame (vmap strips the batch): the generator with this frame's noise maps.
        return torch.func.functional_call(synthesis, {**shared, **frame_noise}, (ws.unsqueeze(0),),
                                          {"noise_mode": "const"})[0]

    downsample = targets.shape[-1] > LOSS_RESOLUTION
    if downsample:
        targets = F.interpolate(targets, size=(LOSS_RESOLUTION, LOSS_RESOLUTION), mode="area")
    with torch.enable_grad():
        for step in range(steps):
            t = step / steps
            adam.param_groups[0]["lr"] = learning_rate(t, config.projection_lr)
            noise_scale = w_std * initial_noise * max(0.0, 1.0 - t / NOISE_RAMP_LENGTH) ** 2
            ws = (w + w_noise[:, step] * noise_scale).unsqueeze(1).repeat([1, G.num_ws, 1])
            images = torch.func.vmap(render)(noise, ws)
            if downsample:
                images = F.interpolate(images, size=(LOSS_RESOLUTION, LOSS_RESOLUTION), mode="area")
            # Sums over frames: each frame's gradient is the one it would get alone.
            distance = lpips_fn(images, targets).sum()
            loss = distance + config.projection_noise_weight * noise_regularization(list(noise.values())).sum()
            adam_step(adam, loss)
            with torch.no_grad():
                _normalize_(noise)
            if on_step is not None:
                on_step(step + 1)
    return w.detach(), {k: v.detach() for k, v in noise.items()}
