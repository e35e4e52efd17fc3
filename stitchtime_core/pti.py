"""Pivotal tuning of ONE generator around the pivots of all frames (paper eq. 1).

min_θ 1/N Σ_i [LPIPS(c_i, r_i) + λ_L2·MSE(c_i, r_i)] + λ_R·L_R, with r_i = G(w_i; θ), and L_R PTI's
locality regulariser: at a code moved α from a pivot towards a random w of the original mapping
(ψ = 0.5), the tuned generator must still agree with the original one (MSE + LPIPS).

Everything random is drawn from the seed and the step number, so a run resumed from a
:class:`PTICheckpoint` takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.adam import adam_for, adam_state, adam_step, load_adam_state
from stitchtime_core.config import PTIConfig
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.projector import LOSS_RESOLUTION


@dataclass
class PTIResult:
    generator: Generator
    """The tuned copy; the original generator is untouched."""
    losses: list[float]
    """Total loss of each step."""
    steps: int


@dataclass
class PTICheckpoint:
    """Where a tuning run stood after ``step`` steps: enough to go on exactly as if never stopped."""

    step: int
    synthesis: dict[str, torch.Tensor]
    """The tuned synthesis network's state dict."""
    optimizer: dict[str, torch.Tensor]
    """Adam's per-parameter moments (``exp_avg.K``, ``exp_avg_sq.K``) and step count (``step``)."""
    losses: list[float]


def pti_steps(num_frames: int, config: PTIConfig) -> int:
    """Steps needed for every frame to be seen ``observations_per_frame`` times."""
    return math.ceil(num_frames * config.observations_per_frame / config.batch_size)


def locality_codes(G: Generator, pivots: torch.Tensor, *, alpha: float, psi: float,
                   generator: torch.Generator) -> torch.Tensor:
    """PTI's regulariser codes: each pivot moved a distance α towards a random w (truncated at ψ)."""
    z = torch.randn([pivots.shape[0], G.z_dim], generator=generator).to(pivots.device)
    return codes_towards(G, pivots, z, alpha=alpha, psi=psi)


def codes_towards(G: Generator, pivots: torch.Tensor, z: torch.Tensor, *, alpha: float, psi: float) -> torch.Tensor:
    """Each pivot [N, num_ws, w_dim] moved a distance α towards the w of its z [N, z_dim] (truncated at ψ)."""
    w = G.mapping(z, truncation_psi=psi)
    direction = w - pivots
    norm = direction.flatten(1).norm(dim=1).clamp_min(1e-8).reshape(-1, 1, 1)
    return pivots + alpha * direction / norm


def locality_loss(G: Generator, tuned: Generator, codes: torch.Tensor, *, config: PTIConfig,
                  lpips_fn: nn.Module) -> torch.Tensor:
    """L_R before its weight λ_R: MSE + LPIPS between the tuned and the original generator's images at the
    regulariser's ``codes`` [N, num_ws, w_dim], rendered with ``config.regularizer_noise``."""
    with torch.no_grad():
        original = G.synthesis(codes, noise_mode=config.regularizer_noise, force_fp32=True)
    moved = tuned.synthesis(codes, noise_mode=config.regularizer_noise, force_fp32=True)
    return F.mse_loss(moved, original) + _lpips(lpips_fn, moved, original, config.lpips_resolution).mean()


def frame_order(num_frames: int, config: PTIConfig) -> torch.Tensor:
    """The frame index of every sample of every step: whole passes over the frames, each shuffled anew
    (``frame_order`` "shuffled") or in frame order ("fixed")."""
    rng = torch.Generator().manual_seed(config.seed)
    total = pti_steps(num_frames, config) * config.batch_size
    passes = range(math.ceil(total / num_frames))
    if config.frame_order == "fixed":
        return torch.arange(num_frames).repeat(len(passes))
    return torch.cat([torch.randperm(num_frames, generator=rng) for _ in passes])


def tune_generator(G: Generator, pivots: torch.Tensor, crops: torch.Tensor, *, config: PTIConfig,
                   lpips_fn: nn.Module, progress: Callable[[int, int, float], None] | None = None,
                   resume: PTICheckpoint | None = None,
                   checkpoint: Callable[[PTICheckpoint], None] | None = None,
                   clock: Callable[[], float] = time.monotonic) -> PTIResult:
    """Tune a copy of ``G`` so that G(pivots[i]) reproduces crops[i] for every frame.

    Args:
        G: the original generator (read only), on the device to train on.
        pivots: [frames, num_ws, w_dim] W+ pivots, on G's device.
        crops: [frames, 3, res, res] aligned crops: float in [-1, 1], or uint8 in [0, 255] (kept as
            they are, 4x smaller, and converted a batch at a time). Any device; batches move to G's.
        config: PTI settings; ``seed`` fixes the frame order and regulariser codes.
        lpips_fn: LPIPS module on G's device.
        progress: called with (step, total steps, loss) after each step.
        resume: a checkpoint of an earlier run with the same inputs and config to go on from; one of
            the last step gives the finished run's generator without a step taken.
        checkpoint: called with the run's state every ``config.checkpoint_every`` steps, after a step that
            ends ``config.checkpoint_seconds`` or more after the last save ended (or the start), and after the
            last step, so that a caller whose own writes fail afterwards can resume the finished run.
            Never called when both intervals are 0.
        clock: seconds of a monotonic clock, read at the start, after every step and after every save (a
            test drives it).

    Returns:
        the tuned generator (eval mode, no gradients) and the loss of every step.

    Raises:
        ValueError: shapes that do not fit, or a checkpoint that does not fit this run.
    """
    if pivots.shape[0] != crops.shape[0]:
        raise ValueError(f"{pivots.shape[0]} pivots for {crops.shape[0]} crops")
    res = G.img_resolution
    if crops.ndim != 4 or crops.shape[1:] != (3, res, res):
        raise ValueError(f"crops must be [frames, 3, {res}, {res}], got {list(crops.shape)}")
    num_frames, total = pivots.shape[0], pti_steps(pivots.shape[0], config)
    tuned = copy.deepcopy(G).train().requires_grad_(False)
    tuned.synthesis.requires_grad_(True)
    params = list(tuned.synthesis.parameters())
    adam = adam_for(params, lr=config.lr)
    losses: list[float] = []
    start = 0
    if resume is not None:
        if not 0 < resume.step <= total:
            raise ValueError(f"checkpoint at step {resume.step} does not fit a run of {total} steps")
        tuned.synthesis.load_state_dict(resume.synthesis)
        try:
            load_adam_state(adam, resume.optimizer)
        except ValueError as exc:
            raise ValueError(f"the checkpoint does not fit this generator: {exc}") from None
        start, losses = resume.step, list(resume.losses)
    order = frame_order(num_frames, config)
    saves = checkpoint is not None and (config.checkpoint_every > 0 or config.checkpoint_seconds > 0)
    last_save = clock()
    for step in range(start, total):
        index = order[step * config.batch_size:(step + 1) * config.batch_size]
        w = pivots[index.to(pivots.device)]
        target = _as_images(crops[index.to(crops.device)], w.device)
        image = tuned.synthesis(w, noise_mode="const", force_fp32=True)
        loss = (config.lambda_lpips * _lpips(lpips_fn, image, target, config.lpips_resolution).mean()
                + config.lambda_l2 * F.mse_loss(image, target))
        if config.lambda_r > 0:
            rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            codes = locality_codes(G, w, alpha=config.locality_alpha, psi=config.locality_psi, generator=rng)
            loss = loss + config.lambda_r * locality_loss(G, tuned, codes, config=config, lpips_fn=lpips_fn)
        adam_step(adam, loss)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, total, losses[-1])
        now = clock()
        if saves and (step + 1 == total
                      or config.checkpoint_every > 0 and (step + 1) % config.checkpoint_every == 0
                      or config.checkpoint_seconds > 0 and now - last_save >= config.checkpoint_seconds):
            checkpoint(PTICheckpoint(step + 1, _detached(tuned.synthesis.state_dict()),
                                     adam_state(adam), list(losses)))
            last_save = clock()  # from the end of a save: a slow store is not written to without a break
    return PTIResult(tuned.eval().requires_grad_(False), losses, total)


def reconstruction_lpips(G: Generator, tuned: Generator, pivots: torch.Tensor, crops: torch.Tensor, *,
                         lpips_fn: nn.Module, frames: Sequence[int], resolution: int = LOSS_RESOLUTION,
                         batch_size: int = 4) -> tuple[float, float]:
    """How well the pivots reconstruct their crops before and after tuning: mean LPIPS over some frames.

    "Before" is the original generator at the pivots, G(w_i), so it measures the pivots themselves
    (e4e's or the projector's); "after" is the tuned one, G(w_i; θ_p). Images are area-downsampled
    to ``resolution`` first, as the projector measures them, so the numbers compare across
    generator sizes and with the projector's loss.

    Args:
        G: the original generator.
        tuned: the tuned generator (same architecture as G), on G's device.
        pivots: [N, num_ws, w_dim] W+ pivots, on G's device.
        crops: [N, 3, res, res] aligned crops: uint8 in [0, 255] or float in [-1, 1], any device.
        lpips_fn: LPIPS module on G's device.
        frames: indices into ``pivots`` and ``crops`` of the frames to measure (e.g. a few spread
            over the clip: each costs two generator passes), at least one.
        resolution: side the images are area-downsampled to before LPIPS when larger (0: never).
        batch_size: frames per generator pass, >= 1.

    Returns:
        (before, after): the mean LPIPS over ``frames`` of the original and of the tuned generator.

    Raises:
        ValueError: no frames, an index out of range, pivots and crops of different lengths, crops
            that are not [N, 3, res, res], or a batch size below 1.
    """
    if pivots.shape[0] != crops.shape[0]:
        raise ValueError(f"{pivots.shape[0]} pivots for {crops.shape[0]} crops")
    res = G.img_resolution
    if crops.ndim != 4 or crops.shape[1:] != (3, res, res):
        raise ValueError(f"crops must be [frames, 3, {res}, {res}], got {list(crops.shape)}")
    index = torch.as_tensor(list(frames), dtype=torch.long)
    if index.numel() == 0 or index.ndim != 1:
        raise ValueError("frames must list at least one frame index")
    if index.min() < 0 or index.max() >= pivots.shape[0]:
        raise ValueError(f"frame indices must lie in [0, {pivots.shape[0] - 1}], got {index.tolist()}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    totals = [0.0, 0.0]
    with torch.no_grad():
        for batch in index.split(batch_size):
            w = pivots[batch.to(pivots.device)]
            target = _as_images(crops[batch.to(crops.device)], w.device)
            for n, generator in enumerate((G, tuned)):
                image = generator.synthesis(w, noise_mode="const", force_fp32=True)
                totals[n] += float(_lpips(lpips_fn, image, target, resolution).sum())
    return totals[0] / len(index), totals[1] / len(index)


def _lpips(lpips_fn: nn.Module, a: torch.Tensor, b: torch.Tensor, resolution: int) -> torch.Tensor:
    """LPIPS of two image batches, area-downsampled first to ``resolution`` when that is smaller (0: never)."""
    if 0 < resolution < a.shape[-1]:
        a, b = (F.interpolate(x, size=(resolution, resolution), mode="area") for x in (a, b))
    return lpips_fn(a, b)


def _as_images(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    crops = crops.to(device)
    if crops.dtype == torch.uint8:
        return crops.float().div(127.5).sub(1)
    return crops


def _detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}

