"""The crops PTI reads: all of a clip's, in any order, from a file mapped into memory, not from the heap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stitchtime_core.malloc import keep_freed_memory
from tasks.stages.base import StageRef
from tasks.stages.formats import CROP_CHUNK, crops_chw, put_crops
from tasks.store import FileStore


def anonymous_mb() -> float:
    """This process's memory that no file backs (the heap): what a clip's crops must not add to."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def test_the_crops_come_whole_and_in_order_without_growing_the_heap(tmp_path: Path) -> None:
    keep_freed_memory()  # as in a stage's process: the heap then keeps what a chunk's reading frees, no more
    sizes = (CROP_CHUNK,) * 8 + (3,)
    store, frames, size = FileStore(tmp_path / "store"), sum(sizes), 256
    rng = np.random.default_rng(0)
    chunks = [put_crops(store, "align/k", i, list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)))
              for i, n in enumerate(sizes)]
    align = StageRef("align", "align/k", False, 0.0,
                     {"crop_chunks": chunks, "edited_frames": frames, "resolution": size})
    expected = torch.cat([store.get_tensors(key)["crops"].permute(0, 3, 1, 2) for key in chunks])

    before = anonymous_mb()
    crops = crops_chw(store, align)
    added = anonymous_mb() - before
    assert crops.shape == (frames, 3, size, size) and crops.dtype == torch.uint8
    # Read as PTI reads them, a few frames at a time in any order.
    order = torch.randperm(frames, generator=torch.Generator().manual_seed(0))
    for index in order.split(4):
        assert torch.equal(crops[index], expected[index])
    crops_mb = frames * 3 * size * size / 2**20  # 96 MB, 12 MB a chunk
    assert added < crops_mb / 3, (added, crops_mb)
    assert anonymous_mb() - before < crops_mb / 3  # reading them maps the file's pages, not the heap's
