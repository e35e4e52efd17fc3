"""Stage 4, encode: the W+ pivots of every aligned crop, from the profile's encoder or by optimisation."""

from __future__ import annotations

from typing import Any

import torch

from stitchtime_core.config import EncodingConfig
from stitchtime_core.models.e4e import encode
from stitchtime_core.projector import project_pivots, projection_plan
from stitchtime_core.tensors import images_to_tensor
from tasks.progress import stage_progress
from tasks.stages.networks import Runtime
from tasks.stages.base import Ingredients, Stage, StageRef, short_key, stage_task
from tasks.stages.formats import CROP_CHUNK, iter_crops
from tasks.store import open_store

STAGE = Stage("encode", version=2)


def ingredients(align: StageRef, config: EncodingConfig, runtime: Runtime) -> Ingredients:
    # The projector's settings do not touch the encoder's pivots: leave them out of the key when it encodes.
    keyed = config if config.method == "optimization" else EncodingConfig(batch_size=config.batch_size,
                                                                          resize=config.resize)
    return [align.key, runtime.networks.identity], keyed


@stage_task("encode")
def encode_pivots(store_uri: str, align: StageRef, config: EncodingConfig, runtime: Runtime) -> StageRef:
    """W+ pivots of every aligned crop: the encoder's, or per-frame optimisation (the "w/o e4e" ablation)."""
    store = open_store(store_uri)
    models, device = runtime.networks, runtime.device

    def produce(key: str) -> dict[str, Any]:
        pivots = []
        frames, projecting = int(align.info["edited_frames"]), config.method == "optimization"
        with stage_progress("encode", total=projection_steps(frames, config) if projecting else frames,
                            unit="step" if projecting else "frame", label=short_key(key)) as advance:
            for crops in iter_crops(store, align):
                if projecting:  # seeded by the chunk's first row, so every frame has its own noise
                    start = pivots[-1][-1, 0].to(device) if pivots and config.warm_start_steps else None
                    pivots.append(project_pivots(models.generator, images_to_tensor(crops, device), config=config,
                                                 lpips_fn=runtime.lpips,
                                                 seed=sum(len(p) for p in pivots), start=start,
                                                 progress=lambda step, steps: advance(1)).cpu())
                    continue
                for start in range(0, len(crops), config.batch_size):
                    with torch.no_grad():
                        batch = images_to_tensor(crops[start:start + config.batch_size], device)
                        pivots.append(encode(models.encoder, batch, models.latent_avg, resize=config.resize).cpu())
                    advance(len(batch))
        store.put_tensors(f"{key}/pivots.safetensors", {"pivots": torch.cat(pivots)})
        return {"frames": sum(len(p) for p in pivots), "method": config.method}

    return STAGE.make(store, ingredients(align, config, runtime), produce)


TASK = encode_pivots


def projection_steps(frames: int, config: EncodingConfig) -> int:
    """Optimisation steps the projector takes for ``frames`` crops, stored chunk by stored chunk (with warm
    starts, each chunk's first frame starts from the chunk before)."""
    return sum(steps for start in range(0, frames, CROP_CHUNK)
               for _, steps in projection_plan(min(CROP_CHUNK, frames - start), config, warm=start > 0))
