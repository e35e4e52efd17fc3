"""Stage 6, edit: the edited latents w_i + δw (paper section 3.3)."""

from __future__ import annotations

import os
from typing import Any

from stitchtime_core.config import EditingConfig
from stitchtime_core.editing import edit_latents
from stitchtime_core.errors import StitchtimeError
from tasks.stages.networks import Runtime, resolve_edits
from tasks.stages.base import Ingredients, Stage, StageRef, content_hash, stage_task
from tasks.store import open_store

STAGE = Stage("edit", version=1)


def ingredients(pivots: StageRef, config: EditingConfig, runtime: Runtime) -> Ingredients:
    # Direction files enter by their content, so an edited file gives a new key.
    files = [content_hash(name) for name, _ in config.edits if os.path.isfile(name)]
    return [pivots.key, runtime.networks.identity, *files], config


@stage_task("edit")
def edit_pivots(store_uri: str, pivots: StageRef, config: EditingConfig, runtime: Runtime) -> StageRef:
    """Edited latents w_i + δw (paper section 3.3)."""
    store = open_store(store_uri)
    device = runtime.device

    def produce(key: str) -> dict[str, Any]:
        w = store.get_tensors(f"{pivots.key}/pivots.safetensors", device=device)["pivots"]
        try:
            directions = resolve_edits(runtime, config.edits, halve=config.halve_files)
        except ValueError as exc:
            raise StitchtimeError(str(exc)) from None
        store.put_tensors(f"{key}/latents.safetensors", {"latents": edit_latents(w, directions).cpu()})
        return {"edits": [list(e) for e in config.edits]}

    return STAGE.make(store, ingredients(pivots, config, runtime), produce)
