"""Stage 3, align: the gap plan, temporally smoothed FFHQ quads, and the aligned crops of the frames to edit."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stitchtime_core import alignment, video
from stitchtime_core.config import AlignmentConfig
from tasks.progress import stage_progress
from tasks.stages.base import Ingredients, Stage, StageRef, stage_task
from tasks.stages.formats import CROP_CHUNK, put_crops
from tasks.store import open_store

STAGE = Stage("align", version=2)


def ingredients(landmarks: StageRef, config: AlignmentConfig, resolution: int) -> Ingredients:
    return [landmarks.key, str(resolution)], config


@stage_task("align")
def align_faces(store_uri: str, source: str, probe: StageRef, landmarks: StageRef, config: AlignmentConfig,
                resolution: int) -> StageRef:
    """Gap plan, temporally smoothed FFHQ quads, and the aligned crops of the frames to edit.

    Crops are written in chunks of :data:`~tasks.stages.formats.CROP_CHUNK` frames as the video streams
    past, so memory does not grow with the clip's length.
    """
    store = open_store(store_uri)
    info = video.VideoInfo.from_dict(probe.info["video"])

    def produce(key: str) -> dict[str, Any]:
        table = store.get_table(f"{landmarks.key}/landmarks.parquet")
        points, found = table["landmarks"], table["found"]
        quads, interpolated, passthrough = alignment.track_quads(points, found, config=config, fps=float(info.fps))
        edited = ~passthrough
        filled = alignment.interpolate_gaps(points, found, valid=edited)
        crop_points = np.full_like(points, np.nan)
        for i in np.flatnonzero(edited):
            crop_points[i] = alignment.landmarks_to_crop(filled[i], quads[i], resolution)
        chunks, pending = [], []
        with stage_progress("align", total=info.frame_count, unit="frame", label=os.path.basename(source)) as advance:
            for i, frame in enumerate(video.iter_frames(source, info)):
                if i < len(edited) and edited[i]:
                    pending.append(alignment.crop(frame, quads[i], resolution, pad=config.pad,
                                                  shrink_by=config.shrink_by, sampler=config.sampler))
                if len(pending) == CROP_CHUNK:
                    chunks.append(put_crops(store, key, len(chunks), pending))
                    pending = []
                advance(1)
        if pending:
            chunks.append(put_crops(store, key, len(chunks), pending))
        status = np.where(found, "found", np.where(interpolated, "interpolated", "passthrough"))
        store.put_table(f"{key}/frames.parquet", {"frame": np.arange(len(found)), "status": status,
                                                  "quad": quads, "crop_landmarks": crop_points})
        return {"frames": int(len(found)), "edited_frames": int(edited.sum()), "resolution": resolution,
                "crop_chunks": chunks, "interpolated": np.flatnonzero(interpolated).tolist(),
                "passed_through": np.flatnonzero(passthrough).tolist()}

    return STAGE.make(store, ingredients(landmarks, config, resolution), produce)
