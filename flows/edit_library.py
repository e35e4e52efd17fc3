"""The ``edit_library`` flow: every video under a folder or ``s3://`` prefix, each as an ``edit_video``
subflow, under a concurrency limit; one video's failure never stops the others."""

from __future__ import annotations

import contextvars
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow

from flows.edit_video import edit_video
from stitchtime_core.config import default_quality
from stitchtime_core.errors import InputError, StitchtimeError
from tasks import library
from tasks.outputs import output_paths, report_path, sidecar_paths
from tasks.store import open_store

log = logging.getLogger("stitchtime")


@flow(name="edit_library")
def edit_library(source: str, dest: str, edits: list[list[tuple[str, float]]], profile: str = "tiny",
                 store: str | None = None, device: str = "cpu", models_dir: str | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, concurrency: int = 2,
                 chunk_size: int = 16, fan_out: str | None = None, quality: str | None = None,
                 placement: dict[str, str] | None = None, preset: str = "paper") -> dict[str, Any]:
    """Edit every video under ``source`` into ``dest`` under the same relative name.

    Args:
        source: a folder or an ``s3://bucket/prefix`` holding videos (any depth).
        dest: a folder or an ``s3://bucket/prefix`` for the outputs, their summaries and the batch's.
        edits: edit sets, one output per set, as :func:`flows.edit_video.edit_video` takes them.
        profile, store, device, models_dir, overrides, chunk_size, fan_out, quality, placement, preset: as for
            ``edit_video``; every video shares the store, so a re-run does only what is missing.
        concurrency: how many videos run at once.

    Returns:
        the batch summary (also written to ``dest``/:data:`library.BATCH_SUMMARY`): every video with its
        status ("done", "skipped": already in ``dest``, or "failed" with the error), and the counts. Entries
        the listing refuses unread (a symlink leading outside the library, a symlink loop: see
        :func:`tasks.library.list_library`) are failed videos.

    Raises:
        ValueError: ``dest`` is ``source``, lies inside it or holds it (see :func:`tasks.library.check_apart`).
        InputError, StoreError: ``dest`` cannot be written (see :func:`tasks.library.check_dest`).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    library.check_apart(source, dest)
    started = time.perf_counter()
    listing = library.list_library(source)
    names = listing.videos
    if not names and not listing.refused:
        raise StitchtimeError(f"{source}: no videos found (looked for {', '.join(library.VIDEO_SUFFIXES)})")
    library.check_dest(dest)  # made only now: a batch with nothing to edit leaves no folder behind

    outs = library.output_names(names)
    first_with: dict[str, str] = {}  # output name -> the video that gets it: its own name first
    for name in sorted(names, key=lambda n: (outs[n] != n, n)):
        first_with.setdefault(outs[name], name)

    def one(name: str) -> dict[str, Any]:
        if first_with[outs[name]] != name:  # x.webm.mp4 beside x.webm and x.mp4: never two runs on one output
            shown = library.display(source, name)
            clash = InputError(shown, f"its output {outs[name]} would also be that of {first_with[outs[name]]}; "
                                      "rename one of them")
            return _failed(shown, name, clash, str(clash), time.perf_counter())
        return _edit_one(name, outs[name], source=source, dest=dest, edits=edits, profile=profile, store=store,
                         device=device, models_dir=models_dir, overrides=overrides, chunk_size=chunk_size,
                         fan_out=fan_out, quality=quality, placement=placement, preset=preset)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        # Each thread runs its subflow in a copy of this flow's context, so Prefect nests it here.
        futures = [pool.submit(contextvars.copy_context().run, one, name) for name in names]
        videos = [future.result() for future in futures]
    for name, problem in listing.refused.items():  # never read: a symlink out of the library, a loop, ...
        refusal = InputError(library.display(source, name), problem)
        videos.append(_failed(refusal.path, name, refusal, str(refusal), time.perf_counter()))
    videos.sort(key=lambda video: video["name"])
    counts = {status: sum(v["status"] == status for v in videos) for status in ("done", "skipped", "failed")}
    summary = {"source": source, "dest": dest, "edits": [[list(e) for e in s] for s in edits], "profile": profile,
               "quality": quality or default_quality(device), "preset": preset, "videos": videos, "counts": counts,
               "total_seconds": round(time.perf_counter() - started, 3)}
    _write_summary(dest, summary)
    for video in videos:
        if video["status"] == "failed":
            log.error("%s failed: %s", video["source"], detail(video))
    return summary


def _edit_one(name: str, out_name: str, *, source: str, dest: str, edits: list[list[tuple[str, float]]],
              **options: Any) -> dict[str, Any]:
    """One video, whose output is named ``out_name``: skip it when done, else edit it (as a subflow) and
    deliver its outputs; never raises."""
    shown = library.display(source, name)
    started = time.perf_counter()
    try:
        library.check_name(source, name)  # before the name makes any path or key
    except InputError as exc:
        return _failed(shown, name, exc, str(exc), started)
    with tempfile.TemporaryDirectory(prefix="stitchtime-batch-") as staging:
        out = library.local_output(dest, out_name, Path(staging))
        summary_path = sidecar_paths(out)[0]
        if library.is_done(dest, name, out_name, summary_path.name, source=source):
            log.info("%s: already done, skipped", shown)
            return {"source": shown, "name": name, "status": "skipped"}
        local = None
        try:
            local = library.local_source(source, name, Path(staging))
            out.parent.mkdir(parents=True, exist_ok=True)
            edit_video(str(local), str(out), edits, **options)
            videos = [path for _, path in output_paths(out, edits)]
            files = [*videos, *map(report_path, videos), sidecar_paths(out)[1]]
            delivered = library.deliver(dest, out_name, files, Path(staging))
            # Staged files are gone once this video is done: its summary names what the destination holds.
            published = dict(zip(map(str, files), delivered)) if library.is_remote(dest) else {}
            if Path(staging) in local.parents:
                published[str(local)] = shown
            if published:
                library.publish_summary(summary_path, published)
            delivered += library.deliver(dest, out_name, [summary_path], Path(staging))  # the summary last
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the batch
            message = str(exc) if local is None else str(exc).replace(str(local), shown)
            return _failed(shown, name, exc, message, started)
    return {"source": shown, "name": name, "status": "done", "outputs": delivered[:len(videos)],
            "reports": delivered[len(videos):-2], "summary": delivered[-1],
            "seconds": round(time.perf_counter() - started, 3)}


def _failed(shown: str, name: str, exc: Exception, message: str, started: float) -> dict[str, Any]:
    return {"source": shown, "name": name, "status": "failed", "error": message, "error_type": type(exc).__name__,
            "seconds": round(time.perf_counter() - started, 3)}


def detail(video: dict[str, Any]) -> str:
    """What a batch's line for ``video`` says after its name: its error (which names the video first; that
    name is left out) or its outputs."""
    text = video.get("error") or ", ".join(video.get("outputs", []))
    return text.removeprefix(f"{video['source']}: ")


def _write_summary(dest: str, summary: dict[str, Any]) -> None:
    store = open_store(dest)
    store.put_bytes(library.BATCH_SUMMARY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def exit_status(summary: dict[str, Any]) -> int:
    """0: every video done or skipped; 3: some failed (partial failure); 1: all failed."""
    counts = summary["counts"]
    if not counts["failed"]:
        return 0
    return 1 if counts["failed"] == len(summary["videos"]) else 3

