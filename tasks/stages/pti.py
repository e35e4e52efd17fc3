"""Stage 5, PTI: one generator tuned around the pivots of all frames (paper eq. 1), checkpointed as it goes."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from stitchtime_core.config import PTIConfig, to_dict
from stitchtime_core.models.profiles import generator_config
from stitchtime_core.projector import LOSS_RESOLUTION
from stitchtime_core.pti import pti_steps, reconstruction_lpips, tune_generator
from stitchtime_core.report import choose_keyframes
from stitchtime_core.tensors import tensor_to_images
from tasks.progress import stage_progress
from tasks.stages.networks import Runtime
from tasks.stages.base import Ingredients, Stage, StageRef, short_key, stage_task
from tasks.stages.formats import (crops_chw, edited_rows, read_pti_checkpoint, write_keyframe_inversions,
                                  write_pti_checkpoint)
from tasks.store import ArtifactStore, open_store

STAGE = Stage("pti", version=3)

RECONSTRUCTION_FRAMES = 16
"""The stage measures its reconstruction LPIPS on at most this many frames, spread evenly over the clip
(``reconstruction_frames`` in its info: their indices in the video)."""


def ingredients(align: StageRef, pivots: StageRef, config: PTIConfig, runtime: Runtime) -> Ingredients:
    # How often PTI checkpoints does not change the result, so it is not part of the key. The settings are
    # hashed as before checkpoint_seconds existed, so that stores made then keep their PTI stages.
    settings = to_dict(dataclasses.replace(config, checkpoint_every=0))
    del settings["checkpoint_seconds"]
    return [align.key, pivots.key, runtime.networks.identity], settings


@stage_task("pti")
def tune_pti(store_uri: str, align: StageRef, pivots: StageRef, config: PTIConfig, runtime: Runtime) -> StageRef:
    """One generator tuned around the pivots of all frames (paper eq. 1), checkpointed as it goes.

    A run stopped part way resumes from ``checkpoint.safetensors``, saved every ``checkpoint_every`` steps
    or ``checkpoint_seconds`` seconds, and once more when the last step is taken, before the stage's
    own writes: a retry after one of those fails (a store outage) resumes the finished tuning instead
    of tuning again. The checkpoint is deleted once the stage is done (its ``done.json`` written).
    With ``method`` "none" nothing is tuned (the "w/o PTI" ablation) and later stages use the original
    generator. The stage's info holds the first and last loss and
    how well the pivots reconstruct the crops: the tuned generator's MSE over all frames, and the
    LPIPS of the original and of the tuned generator on at most :data:`RECONSTRUCTION_FRAMES`
    frames (``reconstruction_lpips_before`` / ``_after``, ``reconstruction_frames``).
    """
    store = open_store(store_uri)
    models, device = runtime.networks, runtime.device

    def produce(key: str) -> dict[str, Any]:
        w = store.get_tensors(f"{pivots.key}/pivots.safetensors", device=device)["pivots"]
        if config.method == "none":
            _keep_inversions(store, key, models.generator, w)
            return {"method": "none", "steps": 0}
        lpips_fn = runtime.lpips
        crops = crops_chw(store, align)
        checkpoint_key = f"{key}/checkpoint.safetensors"
        resume = read_pti_checkpoint(store, checkpoint_key) if store.exists(checkpoint_key) else None
        with stage_progress("pti", total=pti_steps(len(w), config), unit="step", label=short_key(key),
                            initial=resume.step if resume else 0) as advance:
            result = tune_generator(models.generator, w, crops, config=config, lpips_fn=lpips_fn,
                                    progress=lambda step, steps, loss: advance(1), resume=resume,
                                    checkpoint=lambda c: write_pti_checkpoint(store, checkpoint_key, c))
        mse = 0.0
        with torch.no_grad():
            for part in range(0, len(w), config.batch_size):
                images = crops[part:part + config.batch_size].to(device).float().div(127.5).sub(1)
                mse += float(torch.nn.functional.mse_loss(result.generator.synthesis(w[part:part + config.batch_size]),
                                                          images, reduction="sum"))
        # LPIPS at 256 px (area-downsampled, as the projector measures it) on at most
        # RECONSTRUCTION_FRAMES frames spread evenly over the clip: each costs two generator passes.
        rows = choose_keyframes(len(w), RECONSTRUCTION_FRAMES)
        before, after = reconstruction_lpips(models.generator, result.generator, w, crops, frames=rows,
                                             lpips_fn=lpips_fn, resolution=LOSS_RESOLUTION)
        _keep_inversions(store, key, result.generator, w)
        store.put_tensors(f"{key}/generator.safetensors", result.generator.state_dict())
        store.put_json(f"{key}/generator.json", generator_config(result.generator))
        return {"method": "pti", "steps": result.steps, "resumed_from_step": resume.step if resume else 0,
                "first_loss": result.losses[0], "last_loss": result.losses[-1],
                "reconstruction_mse": mse / crops.numel(),
                # Mean LPIPS to the crops of G(pivot) (the pivots' own reconstruction) and of the tuned G.
                "reconstruction_lpips_before": before, "reconstruction_lpips_after": after,
                "reconstruction_frames": edited_rows(store, align)["frame"][rows].tolist()}

    ref = STAGE.make(store, ingredients(align, pivots, config, runtime), produce)
    # Deleted once done.json is written, not before: a run stopped in between goes on from the checkpoint.
    if store.exists(f"{ref.key}/checkpoint.safetensors"):
        store.delete(f"{ref.key}/checkpoint.safetensors")
    return ref


TASK = tune_pti


def _keep_inversions(store: ArtifactStore, key: str, G: torch.nn.Module, w: torch.Tensor) -> None:
    """Store θ_p's inversions of the report's keyframes, so that the report runs no network."""
    rows = choose_keyframes(len(w))
    with torch.no_grad():
        images = tensor_to_images(G.synthesis(w[rows], noise_mode="const", force_fp32=True))
    write_keyframe_inversions(store, key, rows, images)
