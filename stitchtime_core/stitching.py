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

With ``warm_start`` (``StitchingConfig``), neighbouring frames start from each other's tuned weights
(and, with ``warm_optimizer`` "carried", Adam's state) and take fewer steps (:func:`tuning_plan`): less
work for the same boundary error (see the README's method section for the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap

from stitchtime_core.adam import adam_for, adam_state, adam_step, keep_rows, load_adam_state
from stitchtime_core.config import StitchingConfig
from stitchtime_core.models.stylegan2 import Generator


@dataclass
class Tuned:
    """Where each frame of a batch ended, for the frames that go on from it (warm starts)."""

    weights: dict[str, torch.Tensor]
    """Synthesis parameter name -> [frames, ...] each frame's tuned weights."""
    adam: dict[str, torch.Tensor] | None
    """Adam's state as :func:`stitchtime_core.adam.adam_state` flattens it, each tensor [frames, ...] and
    ``step`` [frames]; None when warm frames start with a fresh Adam."""

    def rows(self, count: int) -> Tuned:
        """The first ``count`` frames."""
        adam = None if self.adam is None else {k: v[:count] for k, v in self.adam.items()}
        return Tuned({k: p[:count] for k, p in self.weights.items()}, adam)


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
        stitched, steps = torch.empty_like(edits), torch.zeros(frames, dtype=torch.int64)
        tuned = None
        for plan_rows, warm in tuning_plan(frames, config):
            rows = torch.tensor(plan_rows, dtype=torch.int64)
            start = tuned.rows(len(rows)) if warm else None
            stitched[rows], steps[rows], tuned = _tune_batch(
                G, edited_latents[rows], crops[rows], edits[rows], masks[rows], boundaries[rows], config=config,
                steps=warm_steps(config) if warm else config.steps, start=start, progress=progress,
                keep_weights=config.warm_start > 0)
    return StitchResult(stitched, edits, boundary_error(edits, crops, boundaries),
                        boundary_error(stitched, crops, boundaries), steps)


def warm_steps(config: StitchingConfig) -> int:
    """Steps of a frame that starts from its neighbour's tuned weights: ceil(warm_start·steps), at least 1."""
    return max(1, math.ceil(config.warm_start * config.steps - 1e-9))  # 0.3·100 is 30.000000000000004


def tuning_plan(frames: int, config: StitchingConfig) -> list[tuple[list[int], bool]]:
    """The frames tuned together, batch after batch, and whether they start warm (from the weights the
    previous batch's rows ended with, row for row).

    Without warm starts: ``batch_size`` neighbouring frames at a time, all from θ_p. With them: the frames
    are split into ``batch_size`` runs of neighbours (the first runs one frame longer where they do not
    divide evenly); batch t holds the t-th frame of each run still going, so row r of a batch follows row
    r of the batch before.
    """
    if not config.warm_start:
        return [(list(range(start, min(start + config.batch_size, frames))), False)
                for start in range(0, frames, config.batch_size)]
    runs = [list(run) for run in torch.arange(frames).tensor_split(min(config.batch_size, frames))]
    return [([run[t] for run in runs if t < len(run)], t > 0) for t in range(len(runs[0]) if runs else 0)]


def masked_distances(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, *, kind: str,
                     normalise: str) -> torch.Tensor:
    """Each frame's masked L1 or L2 distance |a⊙m − b⊙m|: the stitching losses of eqs. 2-3.

    Args:
        a, b: [frames, 3, H, W].
        mask: [frames, 1, H, W] in [0, 1].
        kind: "l1" or "l2" (the square of the difference).
        normalise: "mask": the sum over channels and pixels divided by the mask's sum (the reference code's
            ``masked_l2``); "pixels": the mean over all 3·H·W values.

    Returns:
        [frames].
    """
    # a⊙m − b⊙m as the reference computes it: (a − b)⊙m rounds differently, and Adam's first steps, which
    # divide each gradient by its own size, turn that into different weights where gradients are tiny.
    diff = a * mask - b * mask
    error = diff.abs() if kind == "l1" else diff.square()
    if normalise == "pixels":
        return error.mean(dim=(1, 2, 3))
    # An empty mask has nothing to pull on: 0, where the reference code divides 0 by 0.
    return error.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-12)


def _tune_batch(G: Generator, w: torch.Tensor, crop: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor,
                boundary: torch.Tensor, *, config: StitchingConfig, steps: int, start: Tuned | None,
                progress: Callable[[int], None] | None,
                keep_weights: bool) -> tuple[torch.Tensor, torch.Tensor, Tuned | None]:
    """Tune one weight copy per frame of a batch for up to ``steps`` steps, from θ_p or from ``start``
    (the frames before, row for row: their weights, and Adam's state when it is carried); frames that stop
    early leave the batch (and are reported to ``progress`` then).

    Returns:
        the stitched images, the steps each frame took, and with ``keep_weights`` where each frame ended
        (Adam's state too with ``warm_optimizer`` "carried").
    """
    synthesis = G.synthesis
    buffers = dict(synthesis.named_buffers())

    def one_frame(params: dict[str, torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
        # Unfused modulation, as in the reference code, which tunes G in training mode: the same numbers up to
        # rounding, which Adam's first steps (each gradient over its own size) would otherwise magnify.
        return functional_call(synthesis, (params, buffers), (ws[None],),
                               {"noise_mode": "const", "force_fp32": True, "fused_modconv": False})[0]

    def alone(params: dict[str, torch.Tensor], ws: torch.Tensor) -> torch.Tensor:
        # One frame needs no vmap, whose batching rules copy activations between layouts (2x slower on a CPU).
        return one_frame({name: p[0] for name, p in params.items()}, ws[0])[None]

    frames = w.shape[0]
    forward = alone if frames == 1 else vmap(one_frame)
    names = [name for name, _ in synthesis.named_parameters()]
    first = start.weights if start else {name: p.detach().expand(frames, *p.shape)
                                         for name, p in synthesis.named_parameters()}
    adam = adam_for([first[name].clone(memory_format=torch.contiguous_format).requires_grad_(True)
                     for name in names], lr=config.lr)
    if start is not None and start.adam is not None:
        # One step count per batch: the frames before took the same steps unless one stopped early.
        load_adam_state(adam, {**start.adam, "step": start.adam["step"].min()})
    final = None
    if keep_weights:
        carried = None
        if config.warm_optimizer == "carried":
            carried = {f"{kind}.{i}": torch.zeros_like(first[name]) for i, name in enumerate(names)
                       for kind in ("exp_avg", "exp_avg_sq")}
            carried["step"] = torch.zeros(frames, device=w.device)
        final = Tuned({name: torch.empty_like(first[name]) for name in names}, carried)

    def params() -> dict[str, torch.Tensor]:
        return dict(zip(names, adam.param_groups[0]["params"], strict=True))

    def where(which: torch.Tensor) -> Tuned:
        """Where the active frames ``which`` selects are now (Adam's state only when it is carried)."""
        state = None if final is None or final.adam is None else adam_state(adam)
        return Tuned({k: p.detach()[which] for k, p in params().items()},
                     None if state is None else {k: v.expand(len(active))[which] if k == "step" else v[which]
                                                 for k, v in state.items()})

    def keep(rows: torch.Tensor, ended: Tuned) -> None:
        if final is not None:
            for k, p in ended.weights.items():
                final.weights[k][rows] = p
            for k, v in (ended.adam or {}).items():
                final.adam[k][rows] = v.to(final.adam[k].device)

    active = torch.arange(frames, device=w.device)
    stitched = torch.empty_like(edit)
    taken = torch.zeros(frames, dtype=torch.int64)
    before = config.early_stop_check == "before"

    def distance(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return masked_distances(a, b, m, kind=config.loss, normalise=config.normalise)

    for step in range(1, steps + 1):
        image = forward(params(), w[active])
        border_loss = distance(image, crop[active], boundary[active])
        loss = border_loss + config.lambda_m * distance(image, edit[active], mask[active])
        stopped = border_loss.detach() < config.early_stop_loss
        if before and stopped.any():
            # Checked before the update (the reference code): these frames stop with the weights and image
            # they have now (indexing copies them before the step) and take no part in it.
            stitched[active[stopped]] = image.detach()[stopped]
            done = where(stopped)
            loss = loss[~stopped]
        if len(loss):
            # Summing the frames' losses gives each frame's weights exactly its own loss's gradient.
            adam_step(adam, loss.sum())
            taken[active[~stopped].cpu() if before else active.cpu()] = step
        if stopped.any() and (before or step < steps):
            if not before:
                done = where(stopped)
                with torch.no_grad():
                    stitched[active[stopped]] = forward(done.weights, w[active[stopped]])
            keep(active[stopped], done)
            adam = keep_rows(adam, ~stopped)
            left = len(active)
            active = active[~stopped]
            if progress is not None:
                progress(left - len(active))
            if len(active) == 0:
                return stitched, taken, final
    with torch.no_grad():
        stitched[active] = forward(params(), w[active])
    if final is not None:
        keep(active, where(torch.ones(len(active), dtype=torch.bool, device=active.device)))
    if progress is not None:
        progress(len(active))
    return stitched, taken, final
