"""Stage 2, landmarks: dlib's 68 points of one face track in every frame."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from stitchtime_core import faces, video
from stitchtime_core.config import AlignmentConfig
from stitchtime_core.errors import InputError, NoFaceError
from tasks.progress import stage_progress
from tasks.stages.base import Ingredients, Stage, StageRef, stage_task
from tasks.store import open_store

STAGE = Stage("landmarks", version=2)


def ingredients(probe: StageRef, config: AlignmentConfig) -> Ingredients:
    # Only detection settings change landmarks; smoothing and gaps belong to the align stage.
    return [probe.key], {"detector": config.detector, "upsample": config.detector_upsample,
                         "max_side": config.detect_max_side, "face": config.face}


@stage_task("landmarks")
def detect_landmarks(store_uri: str, source: str, probe: StageRef, config: AlignmentConfig) -> StageRef:
    """dlib 68-point landmarks of one face track in every frame (NaN where the track has no face)."""
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        landmarker = faces.load_landmarker(detector=config.detector, upsample=config.detector_upsample,
                                           max_side=config.detect_max_side)
        info = video.VideoInfo.from_dict(probe.info["video"])
        try:
            with stage_progress("landmarks", total=info.frame_count, unit="frame",
                                label=os.path.basename(source)) as advance:
                track = faces.landmarks_for_video(video.iter_frames(source, info), landmarker, choose=config.face,
                                                  progress=advance)
        except ValueError as exc:  # e.g. --face 2 when the first frame with faces has only two
            raise InputError(source, str(exc)) from None
        if not track.found.any():
            raise NoFaceError(source, f"no face found in any of its {len(track.found)} frames")
        store.put_table(f"{key}/landmarks.parquet", {
            "frame": np.arange(len(track.found)), "found": track.found, "landmarks": track.landmarks,
            "box": track.boxes, "faces": track.faces_per_frame})
        return {"frames": int(len(track.found)), "frames_with_face": int(track.found.sum())}

    return STAGE.make(store, ingredients(probe, config), produce)
