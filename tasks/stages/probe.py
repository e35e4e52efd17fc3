"""Stage 1, probe: the source video's frame count, rate, size, rotation and audio, keyed by its content."""

from __future__ import annotations

from typing import Any

from stitchtime_core import video
from tasks.stages.base import Ingredients, Stage, StageRef, content_hash, stage_task
from tasks.store import open_store

STAGE = Stage("probe", version=1)


def ingredients(source: str) -> Ingredients:
    return [content_hash(source)], None


@stage_task("probe")
def probe_video(store_uri: str, source: str) -> StageRef:
    """Probe the source video; keyed by the file's content hash."""
    info = video.probe(source)
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        store.put_json(f"{key}/probe.json", info.to_dict())
        return {"video": info.to_dict()}

    return STAGE.make(store, ingredients(source), produce)
