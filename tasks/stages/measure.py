"""Stage 9, measure: TL-ID, TG-ID (paper section 4.2) and the identity similarity of an output to its source."""

from __future__ import annotations

from typing import Any

import numpy as np

from stitchtime_core.measure import measure_videos
from tasks.stages.networks import Runtime
from tasks.stages.base import Ingredients, Stage, StageRef, stage_task
from tasks.store import open_store

STAGE = Stage("measure", version=2)


def ingredients(align: StageRef, render: StageRef, runtime: Runtime) -> Ingredients:
    return [align.key, render.key, runtime.identity_network.name], None


@stage_task("measure")
def measure_output(store_uri: str, source: str, out: str, align: StageRef, render: StageRef,
                   runtime: Runtime) -> StageRef:
    """TL-ID, TG-ID and the mean identity similarity to the source of the output ``out`` (the render stage's
    video) against ``source``, both cropped with the align stage's quads.

    Stores the per-frame similarities as ``metrics.parquet``; the stage's info holds the scores
    (``tl_id``, ``tg_id``, ``source_similarity``, the identity network and the counts).
    """
    store = open_store(store_uri)

    def produce(key: str) -> dict[str, Any]:
        quads = store.get_table(f"{align.key}/frames.parquet")["quad"]  # NaN where frames pass through
        result = measure_videos(out, source, quads=np.stack(quads),
                                identity=runtime.identity_network)
        store.put_table(f"{key}/metrics.parquet", {"frame": np.arange(result.frames), "to_source": result.to_source,
                                                   "adjacent": np.append(result.adjacent, np.nan)})
        return {name: value for name, value in result.to_dict().items() if name not in ("adjacent", "to_source")}

    return STAGE.make(store, ingredients(align, render, runtime), produce)
