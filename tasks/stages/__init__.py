"""The pipeline's stages as Prefect tasks, one module each, in the order they run:

====================  ==========================================================================
:mod:`.probe`         the source video's metadata, keyed by its content
:mod:`.landmarks`     dlib's 68 landmarks of one face track in every frame
:mod:`.align`         smoothed FFHQ quads and the aligned crops of the frames to edit
:mod:`.encode`        W+ pivots (the profile's encoder, or optimisation)
:mod:`.pti`           one generator tuned on all frames (PTI)
:mod:`.edit`          edited latents, once per output
:mod:`.stitch`        masks and stitching tuning per frame: plan, chunks (here or on GPU workers), gather
:mod:`.render`        paste-back, encoding, the source's audio
:mod:`.measure`       TL-ID, TG-ID and identity similarity to the source
====================  ==========================================================================

Each module declares its ``STAGE`` (name and code version), its key ``ingredients`` and its task, a
thin adapter: it reads its inputs from the artifact store, calls the core, writes its outputs and
returns a small :class:`~tasks.stages.base.StageRef`, never tensors. What they share:
:mod:`.base` (keys, the ``done.json`` marker, the task wrapper), :mod:`.formats` (the artifacts they
hand each other and their readers) and :mod:`.networks` (the networks, loaded once per process).
"""

from typing import Any

from tasks.stages import encode, pti
from tasks.stages.align import align_faces
from tasks.stages.base import MARKER, StageRef, call, from_parameters, run, short_key, to_parameters
from tasks.stages.edit import edit_pivots
from tasks.stages.encode import encode_pivots
from tasks.stages.landmarks import detect_landmarks
from tasks.stages.measure import measure_output
from tasks.stages.networks import Runtime, resolve_edits
from tasks.stages.probe import probe_video
from tasks.stages.pti import tune_pti
from tasks.stages.render import deliver_output, render_output
from tasks.stages.stitch import (ChunkRunner, StitchChunk, StitchPlan, default_device, fan_out, gather_stitch,
                                 plan_stitch, stitch_chunk, stitch_chunks)
from tasks.store import open_store

ORDER = ("probe", "landmarks", "align", "encode", "pti", "edit", "stitch", "render", "measure")
"""The stages in the order they run."""

PLACEABLE = {"encode": encode, "pti": pti}
"""The stages a run can place on another work pool, whole (``run-stage`` flow runs: the GPU work of a run
besides stitching, which goes there chunk by chunk), by name: each module's ``TASK`` is its stage task."""


def stored(stage: str, store_uri: str, **arguments: Any) -> StageRef | None:
    """A placeable stage's stored result for these arguments of its task (its device included), or None.

    Reads the store only: no network is loaded.
    """
    module = PLACEABLE[stage]
    return module.STAGE.reused(open_store(store_uri), module.STAGE.key(module.ingredients(**arguments)))


__all__ = ["MARKER", "ORDER", "PLACEABLE", "ChunkRunner", "Runtime", "StageRef", "StitchChunk", "StitchPlan",
           "align_faces", "call", "default_device", "deliver_output", "detect_landmarks", "edit_pivots",
           "encode_pivots", "fan_out", "from_parameters", "gather_stitch", "measure_output", "plan_stitch",
           "probe_video", "render_output", "resolve_edits", "run", "short_key", "stitch_chunk", "stitch_chunks",
           "stored", "to_parameters", "tune_pti"]
