"""Benchmark: less stitching work for the same result, on a real run's frames.

Reads the stitch stage's inputs of an earlier ``stitchtime edit`` run from its store (θ_p, the edited
latents, the aligned crops and their landmarks; its summary names them) and stitches its first
``--frames`` edited frames, chunk by chunk as the stitch stage does, once per variant:

- ``reference``: the reference code's loop (a fresh deep copy of θ_p per frame, batch 1,
  ``torch.optim.Adam``, every step), at the base settings;
- ``ours``: :func:`stitchtime_core.stitching.stitch_frames` at the base settings (no warm starts);
- each ``--variant``: the base settings with some changed, e.g. ``warm_start=0.3`` or
  ``early_stop_loss=0.03``, through ``stitch_frames``.

For each: seconds and steps per frame, the final boundary error (mean |s − x| on the boundary), the
content error (mean |s − e| inside the mask: how far stitching moved the edit), TL-ID (the mean
identity similarity of neighbouring stitched crops over that of the source crops, dlib's network) and
the speed-up over the reference loop (with ``--no-reference``: over ``ours``, which does the reference
loop's work at its speed). The base settings are the run's, with ``--steps``/``--lr`` if given.

    .venv/bin/python benchmarks/stitching.py SUMMARY.json [--models models] [--frames 16] [--chunk 16]
        [--steps 100] [--lr 3e-4] [--batch 1] [--variant warm_start=0.3 ...] [--repeat 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from common import write_report
from method import reference_stitching

from stitchtime_core.config import StitchingConfig
from stitchtime_core.identity import load_dlib_identity
from stitchtime_core.stitching import boundary_error, render_edits, stitch_frames
from stitchtime_core.tensors import images_to_tensor, tensor_to_images
from tasks.stages import Runtime
from tasks.stages.align import STAGE as ALIGN
from tasks.stages.edit import STAGE as EDIT
from tasks.stages.formats import CropRows, edited_rows, pti_generator
from tasks.stages.pti import STAGE as PTI
from tasks.stages.stitch import stitch_masks
from tasks.store import open_store


@dataclasses.dataclass
class Frames:
    """What every variant stitches: one run's first frames, with their edits and masks, chunk by chunk."""

    latents: torch.Tensor
    crops: torch.Tensor
    edits: torch.Tensor
    masks: torch.Tensor
    boundaries: torch.Tensor


def load_frames(summary_path: Path, models: str | None, frames: int,
                device: str) -> tuple[torch.nn.Module, Frames, StitchingConfig]:
    summary = json.loads(summary_path.read_text())
    store = open_store(summary["store"])
    artifacts = {**summary["artifacts"], **summary["outputs"][0]["artifacts"]}
    align, pti, edit = (stage.reused(store, artifacts[stage.name]) for stage in (ALIGN, PTI, EDIT))
    networks = Runtime(summary["profile"], models, device).networks
    G = pti_generator(store, pti, networks, device)
    latents = store.get_tensors(f"{edit.key}/latents.safetensors", device=device)["latents"][:frames]
    crops = images_to_tensor(CropRows(store, align).rows(0, len(latents)), device)
    edits = render_edits(G, latents)
    ran = json.loads(Path(summary["config"]).read_text())["stitching"]
    known = {spec.name for spec in dataclasses.fields(StitchingConfig)}  # a run of an older stitchtime
    config = StitchingConfig(**{name: value for name, value in ran.items() if name in known})
    # The masks as the stitch stage makes them, at this stitchtime's settings for what the run did not set.
    _, content, b, _, _ = stitch_masks(networks.parser, edits if config.segment == "edit" else crops,
                                       edited_rows(store, align)["crop_landmarks"][:len(latents)], config)
    return G, Frames(latents, crops, edits, content, b), config


def reference_loop(G: torch.nn.Module, f: Frames, config: StitchingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's per-frame loop, at our loss (the same settings as ``stitch_frames``)."""
    stitched = reference_stitching(G, f.latents, f.crops, f.edits, f.masks, f.boundaries, config=config)
    return stitched, torch.full((len(f.latents),), config.steps)


def ours(G: torch.nn.Module, f: Frames, config: StitchingConfig, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``stitch_frames`` chunk by chunk, as the stitch stage calls it."""
    parts = [stitch_frames(G, f.latents[s], f.crops[s], f.masks[s], f.boundaries[s], config=config, edits=f.edits[s])
             for s in (slice(start, start + chunk) for start in range(0, len(f.latents), chunk))]
    return torch.cat([p.stitched for p in parts]), torch.cat([p.steps for p in parts])


def tl_id(identity, images: np.ndarray) -> float:
    """Mean similarity of neighbouring crops' identity embeddings."""
    embedded = identity.embed(images)
    return float((embedded[1:] * embedded[:-1]).sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path, help="an edit run's summary JSON (its store must still exist)")
    parser.add_argument("--models", default="models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=16, help="frames per chunk (the stitch stage's default)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[],
                        help="settings changed from the base, e.g. warm_start=0.3,early_stop_loss=0.03")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--no-ours", action="store_true", help="skip ours at the base settings (then the speed-up "
                                                               "is over the first variant)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each variant, in turn (the median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    G, f, config = load_frames(args.summary, args.models, args.frames, args.device)
    base = {"batch_size": args.batch, "warm_start": 0.0, "early_stop_loss": 0.0,
            **({"steps": args.steps} if args.steps else {}), **({"lr": args.lr} if args.lr else {})}
    config = dataclasses.replace(config, **base)
    identity = load_dlib_identity()
    source_tl = tl_id(identity, tensor_to_images(f.crops))
    runs = []
    variants = ([("reference", {})] if not args.no_reference else []) + ([("ours", {})] if not args.no_ours else []) + [
        (text, {k: type(getattr(config, k))(v) for k, v in (part.split("=") for part in text.split(","))})
        for text in args.variant]
    one = slice(0, 1)  # warm-up: the first call of a process pays for allocations and kernel choices
    stitch_frames(G, f.latents[one], f.crops[one], f.masks[one], f.boundaries[one],
                  config=dataclasses.replace(config, steps=1), edits=f.edits[one])
    timings: dict[str, list[float]] = {name: [] for name, _ in variants}
    results = {}
    for _ in range(args.repeat):  # the variants in turn, so that a busier minute does not favour one
        for name, changes in variants:
            settings = dataclasses.replace(config, **changes)
            started = time.perf_counter()
            results[name] = (reference_loop(G, f, settings) if name == "reference"
                             else ours(G, f, settings, args.chunk))
            timings[name].append((time.perf_counter() - started) / len(f.latents))
    for name, changes in variants:
        settings, (stitched, steps) = dataclasses.replace(config, **changes), results[name]
        run = {"variant": name, "settings": dataclasses.asdict(settings),
               "seconds_per_frame": round(float(np.median(timings[name])), 3),
               "seconds_per_frame_each": [round(t, 3) for t in timings[name]],
               "steps_per_frame": float(steps.float().mean()),
               "boundary_error": round(float(boundary_error(stitched, f.crops, f.boundaries).mean()), 5),
               "content_error": round(float(boundary_error(stitched, f.edits, f.masks).mean()), 5),
               "tl_id": round(tl_id(identity, tensor_to_images(stitched)) / source_tl, 5)}
        print(json.dumps(run), flush=True)
        runs.append(run)
    baseline = runs[0]  # the reference loop, or with --no-reference ours from θ_p (the same work, measured)
    for run in runs:
        run["speedup"] = round(baseline["seconds_per_frame"] / run["seconds_per_frame"], 2)
        run["speedup_over"] = baseline["variant"]
    write_report(args.out or Path(__file__).parent / "results" / f"stitching-{args.device}.json",
                 "stitching tuning per frame: variants against the reference loop, on a run's frames", runs,
                 summary=str(args.summary), frames=len(f.latents), chunk=args.chunk,
                 boundary_error_raw_edit=round(float(boundary_error(f.edits, f.crops, f.boundaries).mean()), 5),
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


if __name__ == "__main__":
    main()
