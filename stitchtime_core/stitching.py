"""Stitching tuning (paper section 3.4, eqs. 2-4).

For each frame, a copy of the PTI generator θ_p is briefly tuned around the edited pivot so that
its output s_i matches the original crop x_i on the boundary b_i = m_i ⊕ dilate(m_i) and stays
close to the edit e_i inside the mask m_i:  min L1(s⊙b, x⊙b) + λ_m·L1(s⊙m, e⊙m).
Frames are independent: they can run anywhere, in any order.

Several frames are tuned at once, each with its own weights: the synthesis network runs under
``torch.func.vmap`` over a stack of per-frame parameters (StyleGAN2's modulated convolutions
become grouped convolutions), with one Adam state per frame. This gives the same numbers as
tuning a fresh copy of θ_p per frame, one frame at a time (the reference code), without the copies
and with a batch's worth of work per kernel launch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap

from stitchtime_core.adam import adam_for, adam_step, keep_rows
from stitchtime_core.config import StitchingConfig
from stitchtime_core.models.stylegan2 import Generator


@dataclass
class StitchResult:
    stitched: torch.Tensor
    """[frames, 3, res, res] in [-1, 1]: the stitching-tuned generator's images s_i."""
    edits: torch.Tensor
    """[frames, 3, res, res]: the raw edits e_i = G(w_i + δw; θ_p)."""
    boundary_error_before: torch.Tensor
    """[frames]: mean |e_i − x_i| on the boundary (the raw edit)."""
    boundary_error_after: torch.Tensor
    """[frames]: mean |s_i − x_i| on the boundary."""
    steps: torch.Tensor
    """[frames]: optimisation steps each frame took (fewer than configured after an early stop)."""


def boundary_error(images: torch.Tensor, crops: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Per-frame mean absolute difference on the boundary pixels, in [-1, 1] units.

    Args: images, crops [frames, 3, H, W]; boundary [frames, 1, H, W] in {0, 1}. Returns [frames].
    """
    diff = (images - crops).abs() * boundary
    return diff.sum(dim=(1, 2, 3)) / (3 * boundary.sum(dim=(1, 2, 3))).clamp_min(1)


def render_edits(G: Generator, edited_latents: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """e_i = G(w_i + δw; θ_p) for every frame, in batches. Returns [frames, 3, res, res]."""
    with torch.no_grad():
        return torch.cat([G.synthesis(w, noise_mode="const", force_fp32=True)
                          for w in edited_latents.split(batch_size)])


def stitch_frames(G: Generator, edited_latents: torch.Tensor, crops: torch.Tensor, masks: torch.Tensor,
                  boundaries: torch.Tensor, *, config: StitchingConfig, edits: torch.Tensor | None = None,
                  progress: Callable[[int], None] | None = None) -> StitchResult:
    """Stitching-tune each frame from θ_p and return s_i.

    Args:
        G: the PTI-tuned generator θ_p (read only; each frame tunes its own weights).
        edited_latents: [frames, num_ws, w_dim] w_i + δw.
        crops: [frames, 3, res, res] original aligned crops x_i in [-1, 1].
        masks: [frames, 1, res, res] segmentation masks m_i in {0, 1}.
        boundaries: [frames, 1, res, res] boundaries b_i in {0, 1}.
        config: stitching settings; ``batch_size`` frames are tuned at once. With ``method``
            "none" nothing is tuned and s_i = e_i (the "w/o stitching" ablation).
        edits: [frames, 3, res, res] the raw edits e_i when the caller has them already
            (e.g. to segment them); computed from ``edited_latents`` otherwise.
        progress: called with the number of frames just finished, as they finish (a frame that
            stops early finishes before the rest of its batch); the counts add up to ``frames``.

    Returns:
        the stitched images, the edits, boundary errors before and after, and steps per frame.

    Raises:
        ValueError: tensors whose shapes do not fit the generator or each other.
    """
    frames, res = edited_latents.shape[0], G.img_resolution
    for name, t, channels in (("crops", crops, 3), ("masks", masks, 1), ("boundaries", boundaries, 1),
                              ("edits", edits, 3)):
        if t is not None and tuple(t.shape) != (frames, channels, res, res):
            raise ValueError(f"{name} must be [{frames}, {channels}, {res}, {res}], got {list(t.shape)}")
    if edits is None:
        edits = render_edits(G, edited_latents, batch_size=config.batch_size)
    if config.method == "none":
        stitched, steps = edits.clone(), torch.zeros(frames, dtype=torch.int64)
        if progress is not None:
            progress(frames)
    else:
        parts = [_tune_batch(G, edited_latents[part], crops[part], edits[part], masks[part], boundaries[part],
                             config=config, progress=progress)
                 for part in _batches(frames, config.batch_size)]
        stitched = torch.cat([image for image, _ in parts])
        steps = torch.cat([taken for _, taken in parts])
    return StitchResult(stitched, edits, boundary_error(edits, crops, boundaries),
                        boundary_error(stitched, crops, boundaries), steps)


def _batches(frames: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, frames)) for start in range(0, frames, size)]


def _per_frame_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """[frames]: the mean over each frame's pixels of |a⊙m − b⊙m| (or its square)."""
    diff = (a - b) * mask
    return (diff.abs() if kind == "l1" else diff.square()).mean(dim=(1, 2, 3))


def _tune_batch(G: Generator, w: torch.Tensor, crop: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor,
                boundary: torch.Tensor, *, config: StitchingConfig,
                progress: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tune one weight copy per frame of a batch; frames that stop early leave the batch (and are reported
    to ``progress`` then)."""
    synthesis = G.synthesis
    buffers = dict(synthesis.named_buffers())

    def one_frame(params: dict[str, torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
        return functional_call(synthesis, (params, buffers), (ws[None],),
                               {"noise_mode": "const", "force_fp32": True})[0]

    def alone(params: dict[str, torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
        # One frame needs no vmap, whose batching rules copy activations between layouts (2x slower on a CPU).
        return one_frame({name: p[0] for name, p in params.items()}, ws[0])[None]

    frames = w.shape[0]
    forward = alone if frames == 1 else vmap(one_frame)
    names = [name for name, _ in synthesis.named_parameters()]
    adam = adam_for([p.detach().unsqueeze(0).repeat(frames, *[1] * p.ndim).requires_grad_(True)
                     for p in synthesis.parameters()], lr=config.lr)

    def params() -> dict[str, torch.Tensor]:
        return dict(zip(names, adam.param_groups[0]["params"], strict=True))

    active = torch.arange(frames, device=w.device)
    stitched = torch.empty_like(edit)
    steps = torch.zeros(frames, dtype=torch.int64)
    for step in range(1, config.steps + 1):
        image = forward(params(), w[active])
        border_loss = _per_frame_distance(image, crop[active], boundary[active], config.loss)
        content_loss = _per_frame_distance(image, edit[active], mask[active], config.loss)
        # Summing the frames' losses gives each frame's weights exactly its own loss's gradient.
        adam_step(adam, (border_loss + config.lambda_m * content_loss).sum())
        steps[active.cpu()] = step
        stopped = border_loss.detach() < config.early_stop_loss
        if stopped.any() and step < config.steps:
            with torch.no_grad():
                stitched[active[stopped]] = forward({k: p.detach()[stopped] for k, p in params().items()},
                                                    w[active[stopped]])
            adam = keep_rows(adam, ~stopped)
            left = len(active)
            active = active[~stopped]
            if progress is not None:
                progress(left - len(active))
            if len(active) == 0:
                return stitched, steps
    with torch.no_grad():
        stitched[active] = forward(params(), w[active])
    if progress is not None:
        progress(len(active))
    return stitched, steps
