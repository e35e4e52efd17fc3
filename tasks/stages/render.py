"""Stage 8, render: the stitched crops pasted back into every frame, encoded with the source's audio."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stitchtime_core import video
from stitchtime_core.config import BlendingConfig, OutputConfig
from stitchtime_core.files import replacing, writing_output
from stitchtime_core.render import render_video
from tasks.progress import stage_progress
from tasks.stages.base import Ingredients, Stage, StageRef, retrying, stage_task
from tasks.stages.formats import StitchedChunks
from tasks.store import open_store

STAGE = Stage("render", version=2)


def ingredients(probe: StageRef, align: StageRef, stitch: StageRef, blending: BlendingConfig, output: OutputConfig,
                out: str, sampler: str) -> Ingredients:
    # Where the output goes is not part of the key; its container (the suffix) is. The sampler is part of
    # align's key too, but a caller could pass another: the key must follow what this stage was given.
    return [probe.key, align.key, stitch.key, _suffix(out)], {"blending": blending, "output": output,
                                                               "sampler": sampler}


def _suffix(out: str) -> str:
    return os.path.splitext(out)[1] or ".mp4"


@stage_task("render")
def render_output(store_uri: str, source: str, probe: StageRef, align: StageRef, stitch: StageRef,
                  blending: BlendingConfig, output: OutputConfig, out: str, *, sampler: str) -> StageRef:
    """Paste the stitched crops back, encode with the source's audio to ``out`` (atomically), and store a copy.

    ``sampler`` is ``alignment.sampler``, with which the align stage made the crops. When the stage is reused
    nothing is written to ``out``: :func:`deliver_output` copies the stored one.
    """
    store = open_store(store_uri)
    info = video.VideoInfo.from_dict(probe.info["video"])
    suffix = _suffix(out)

    def produce(key: str) -> dict[str, Any]:
        table = store.get_table(f"{align.key}/frames.parquet")
        edited = table["status"] != "passthrough"
        row = np.cumsum(edited) - 1  # frame index -> row among the edited frames
        chunks = StitchedChunks(store, stitch.info["chunks"])
        with stage_progress("render", total=info.frame_count, unit="frame", label=os.path.basename(source)) as advance:
            frames = render_video(source, out, info=info, quads=table["quad"],
                                  crops=lambda i: chunks.row(row[i]) if edited[i] else None,
                                  blending=blending, sampler=sampler, output=output, progress=advance)
        store.put_file(f"{key}/output{suffix}", out)
        return {"frames": frames, "output": f"{key}/output{suffix}"}

    return STAGE.make(store, ingredients(probe, align, stitch, blending, output, out, sampler), produce)


@retrying(name="deliver")
def deliver_output(store_uri: str, render: StageRef, out: str) -> None:
    """Copy a reused render stage's stored output to ``out`` through a temporary name, so ``out`` is never
    half-written.

    Raises:
        InputError: ``out`` cannot be written (a full disk, say): not retried, it would fail the same way.
    """
    # The store's own errors are StoreErrors: an OSError is about writing `out`.
    with writing_output(out), replacing(out) as temp:
        open_store(store_uri).get_file(render.info["output"], temp)
