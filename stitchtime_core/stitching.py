"""Stitching tuning (paper section 3.4, eqs. 2-4).

For each frame, a copy of the PTI generator θ_p is briefly tuned around the edited pivot so that
its output s_i matches the original crop x_i on the boundary b_i = m_i ⊕ dilate(m_i) and stays
close to the edit e_i inside the mask m_i:  min L1(s⊙b, x⊙b) + λ_m·L1(s⊙m, e⊙m).
Frames are independent: they can run anywhere, in any order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from stitchtime_core.config import StitchingConfig
from stitchtime_core.losses import masked_distance
from stitchtime_core.models.stylegan2 import Generator


@dataclass
class StitchResult:
    stitched: torch.Tensor
    """[frames, 3, res, res] in [-1, 1]: the stitching-tuned generator's images s_i."""
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


def stitch_frames(G: torch.nn.Module, edited_latents: torch.Tensor, crops: torch.Tensor, masks: torch.Tensor,
                  boundaries: torch.Tensor, *, config: StitchingConfig) -> StitchResult:
    """Stitching-tune each frame from θ_p and return s_i.

    Args:
        G: the PTI-tuned generator θ_p (read only; each frame tunes its own copy).
        edited_latents: [frames, num_ws, w_dim] w_i + δw.
        crops: [frames, 3, res, res] original aligned crops x_i in [-1, 1].
        masks: [frames, 1, res, res] segmentation masks m_i in {0, 1}.
        boundaries: [frames, 1, res, res] boundaries b_i in {0, 1}.
        config: stitching settings.
    """
    frames, res = edited_latents.shape[0], G.img_resolution
    for name, t, channels in (("crops", crops, 3), ("masks", masks, 1), ("boundaries", boundaries, 1)):
        if tuple(t.shape) != (frames, channels, res, res):
            raise ValueError(f"{name} must be [{frames}, {channels}, {res}, {res}], got {list(t.shape)}")
    with torch.no_grad():
        edits = G.synthesis(edited_latents, noise_mode="const")
    stitched, steps = [], []
    for i in range(frames):
        image, taken = _stitch_one(G, edited_latents[i:i + 1], crops[i:i + 1], edits[i:i + 1], masks[i:i + 1],
                                   boundaries[i:i + 1], config=config)
        stitched.append(image)
        steps.append(taken)
    stitched_t = torch.cat(stitched)
    return StitchResult(stitched_t, boundary_error(edits, crops, boundaries),
                        boundary_error(stitched_t, crops, boundaries), torch.tensor(steps))


def _stitch_one(G: torch.nn.Module, w: torch.Tensor, crop: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor,
                boundary: torch.Tensor, *, config: StitchingConfig) -> tuple[torch.Tensor, int]:
    synthesis = copy.deepcopy(G.synthesis).train().requires_grad_(True)
    optimizer = torch.optim.Adam(synthesis.parameters(), lr=config.lr)
    taken = 0
    for taken in range(1, config.steps + 1):
        image = synthesis(w, noise_mode="const")
        border_loss = masked_distance(image, crop, boundary, kind=config.loss)
        loss = border_loss + config.lambda_m * masked_distance(image, edit, mask, kind=config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if border_loss.item() < config.early_stop_loss:
            break
    with torch.no_grad():
        return synthesis.eval()(w, noise_mode="const"), taken
