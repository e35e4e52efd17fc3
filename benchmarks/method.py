"""Benchmark: stitching tuning and PTI per frame, ours against the reference code, at identical settings.

Random weights, with the FFHQ channel layout (``--channels ffhq``; 1024 px is exactly ffhq.pkl's network, the
GPU default), a narrower one (``small``: at most 128 channels, the CPU default; the FFHQ layout takes about
15 s per PTI step at 64 px on 2 cores) or the tiny profile's (``tiny``). Per resolution, by method:

- ``ours``: stitching through :func:`stitchtime_core.stitching.stitch_frames`, ``--batch`` frames at once
  (each with its own weights); PTI through :func:`stitchtime_core.pti.tune_generator` at each of
  ``--pti-batches``. ``ours-batch1``: the same stitching, one frame at a time.
- ``naive``: the reference code's loops on our generator. Stitching as STIT's ``optimize_border``: per frame
  a fresh ``copy.deepcopy(G).train(True).requires_grad_(True).float()``, ``torch.optim.Adam(G.parameters())``,
  steps of ``G.synthesis(w, noise_mode='const', force_fp32=True)``, then a final render. PTI as PTI's coach:
  one image per step, ``torch.optim.Adam(G.parameters())``, the ``lpips`` package's AlexNet LPIPS + L2.
- ``reference``: the same loops on stylegan2-ada-pytorch's own ``training.networks.Generator`` holding the
  same weights (``--reference PATH`` to its source, default ``$STITCHTIME_REFERENCE``; skipped without it).
  Its CUDA ops run their plain-PyTorch reference paths, as on a CPU, unless ``--reference-ops cuda`` lets it
  build its CUDA extensions.

Settings are identical across methods: steps, lr, the loss (ours: boundary + λ_m·mask, the paper's L1 or
``--loss l2``), masks and edits for stitching; lr, LPIPS + λ_L2·L2 and the locality regulariser off (STIT's
default; ``--pti-lambda-r``) for PTI. Stitching reports seconds per frame and the mean final boundary error
(:func:`stitchtime_core.stitching.boundary_error`; a faster run that stitches worse is no win). With L2 the
methods end within about 1e-6 of each other; with L1 within about 1e-3: every tuning starts at the edit
itself, where the mask term's L1 gradient is the sign of rounding noise, which differs between kernels
(fused or not, batched or not) and which Adam's first, sign-like steps pass on. PTI reports seconds per
step and per frame seen (per step / batch). ``ours`` also runs on a clip of ``--long-frames`` frames: past
the clip's own tensors (``clip_mb``) its memory should not grow with the clip.

Each measurement runs in a fresh subprocess and reports its peak RSS and, on CUDA, its peak GPU memory.
Options for our code (the loops run as the reference code does): ``--dtype bf16`` (autocast around forward,
loss and backward), ``--channels-last`` (the synthesis weights' memory format), ``--compile``
(``torch.compile`` of the synthesis network; ``compiled_graphs`` counts the graphs it made: none for
batched stitching, as ``torch.func.vmap`` of a compiled module called from eager code runs it eagerly).
The first, warm-up run (with ``--compile``: compiling) is timed apart as ``warmup_seconds``.

    .venv/bin/python benchmarks/method.py [--device cpu|cuda] [--sizes 64 256] [--channels small]
        [--frames 8] [--steps 5] [--batch 8] [--long-frames 32] [--pti-batches 1 4 8] [--pti-steps 3]
        [--methods ours ours-batch1 naive reference] [--parts stitch pti] [--reference PATH]
        [--dtype fp32|bf16] [--channels-last] [--compile] [--out FILE]

Results go to ``benchmarks/results/method-<device>.json``: every measurement, and per resolution a summary
with the ratios. With the defaults about 3 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

from common import CHANNELS, peak_memory, run_child, write_report

METHODS = ("ours", "ours-batch1", "naive", "reference")
SKIPPED_REFERENCE = "reference: skipped (give --reference PATH to stylegan2-ada-pytorch's source)"


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    channels: str = "small"
    steps: int = 5
    """Stitching steps per frame (the paper: 100)."""
    loss: str = "l1"
    """Stitching's distance: the paper's L1, or the reference code's L2."""
    pti_steps: int = 3
    """PTI steps timed, after one warm-up step."""
    pti_lambda_r: float = 0.0
    reference: str | None = None
    reference_ops: str = "native"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False


def measure(part: str, size: int, method: str, *, frames: int, batch: int, settings: Settings) -> dict[str, Any]:
    """One measurement: ``part`` "stitch" or "pti" of ``method`` at ``size`` px, on a clip of ``frames``."""
    import torch

    from stitchtime_core.models.stylegan2 import Generator
    from stitchtime_core.stitching import render_edits

    device = settings.device
    torch.manual_seed(0)
    G = Generator(512, 0, 512, size, 3, mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(**CHANNELS[settings.channels], num_fp16_res=4, conv_clamp=256))
    G = G.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        w = G.mapping(torch.randn(frames, 512, device=device), truncation_psi=0.7)
        crops = render_edits(G, G.mapping(torch.randn(frames, 512, device=device), truncation_psi=0.7))
        edits = render_edits(G, w) if part == "stitch" else None
    if part == "pti" and method == "ours":
        # As the PTI stage passes them: uint8 on the CPU, a batch moved to the device per step.
        crops = crops.add(1).mul(127.5).round().clamp(0, 255).to("cpu", torch.uint8)
    result = {"part": part, "method": method, "resolution": size, "frames": frames, "batch": batch,
              "device": device, "channels": settings.channels,
              "synthesis_parameters": sum(p.numel() for p in G.synthesis.parameters())}
    if method == "reference":
        G = load_reference(G, settings.reference, ops=settings.reference_ops)
        result["reference_ops"] = settings.reference_ops
    elif method.startswith("ours"):
        _apply_options(G, settings)
        result.update(dtype=settings.dtype, channels_last=settings.channels_last, compile=settings.compile)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # from here on: the tuning, and the tensors it holds
    if part == "stitch":
        result.update(_stitch(G, w, crops, edits, method=method, batch=batch, settings=settings))
    else:
        result.update(_pti(G, w, crops, method=method, batch=batch, settings=settings))
    if method == "reference":
        from torch_utils.ops import bias_act, upfirdn2d

        result["reference_cuda_ops"] = bias_act._plugin is not None and upfirdn2d._plugin is not None
    if settings.compile:
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"]["unique_graphs"]
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return result | peak_memory(device)


def _stitch(G, w, crops, edits, *, method: str, batch: int, settings: Settings) -> dict[str, Any]:
    import torch

    from stitchtime_core.config import StitchingConfig
    from stitchtime_core.stitching import boundary_error, stitch_frames

    frames, size = crops.shape[0], crops.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt().to(crops.device)
    masks = (radius < size * 0.3).float().expand(frames, 1, size, size).contiguous()
    boundaries = ((radius >= size * 0.3) & (radius < size * 0.35)).float().expand(frames, 1, size, size).contiguous()
    # Every frame from θ_p, as the loops: these random frames are no neighbours, so warm starts (measured
    # on a real clip's frames by benchmarks/stitching.py) have nothing to go on from.
    config = StitchingConfig(steps=settings.steps, batch_size=batch, loss=settings.loss, warm_start=0)

    def run(part: slice, config: StitchingConfig) -> torch.Tensor:
        if method.startswith("ours"):
            with _autocast(settings):
                return stitch_frames(G, w[part], crops[part], masks[part], boundaries[part], config=config,
                                     edits=edits[part]).stitched
        return reference_stitching(G, w[part], crops[part], edits[part], masks[part], boundaries[part],
                                   config=config)

    warmup, _ = _timed(lambda: run(slice(0, batch), dataclasses.replace(config, steps=1)), settings.device)
    seconds, stitched = _timed(lambda: run(slice(None), config), settings.device)
    clip = (w, crops, masks, boundaries, edits, stitched)
    return {"steps": settings.steps, "loss": settings.loss, "warmup_seconds": round(warmup, 4),
            "seconds_per_frame": round(seconds / frames, 4),
            "seconds_per_frame_step": round(seconds / frames / settings.steps, 5),
            "boundary_error_before": round(float(boundary_error(edits, crops, boundaries).mean()), 6),
            "boundary_error_after": round(float(boundary_error(stitched.float(), crops, boundaries).mean()), 6),
            "clip_mb": round(sum(t.numel() * t.element_size() for t in clip) / 2**20, 1)}


def reference_stitching(G, w, crops, edits, masks, boundaries, *, config) -> Any:
    """The reference code's stitching tuning (STIT's ``optimize_border``), one frame at a time, with our loss.

    Args: G a generator with ada's interface; w [frames, num_ws, w_dim]; crops, edits [frames, 3, res, res];
    masks, boundaries [frames, 1, res, res]; config a ``StitchingConfig``. Returns [frames, 3, res, res].
    """
    import torch

    from stitchtime_core.stitching import masked_distances

    stitched = []
    for i in range(w.shape[0]):
        one = slice(i, i + 1)
        tuned = copy.deepcopy(G).train(True).requires_grad_(True).float()
        optimizer = torch.optim.Adam(tuned.parameters(), lr=config.lr)
        for _ in range(config.steps):
            # Unfused modulation, as stylegan2-ada runs a generator in train mode (and as stitch_frames tunes).
            image = tuned.synthesis(w[one], noise_mode="const", force_fp32=True, fused_modconv=False)
            distance = lambda a, b, m: masked_distances(a, b, m, kind=config.loss,  # noqa: E731
                                                        normalise=config.normalise).sum()
            loss = distance(image, crops[one], boundaries[one]) + config.lambda_m * distance(image, edits[one],
                                                                                             masks[one])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            stitched.append(tuned.synthesis(w[one], noise_mode="const", force_fp32=True))
    return torch.cat(stitched)


class _Enough(Exception):
    """Ends a PTI run after the steps to time: its step count is set by the clip's length otherwise."""


def _pti(G, pivots, crops, *, method: str, batch: int, settings: Settings) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from stitchtime_core.config import PTIConfig
    from stitchtime_core.losses import build_lpips
    from stitchtime_core.pti import tune_generator

    frames, steps = crops.shape[0], settings.pti_steps
    config = PTIConfig(observations_per_frame=math.ceil((steps + 1) * batch / frames), batch_size=batch,
                       lambda_r=settings.pti_lambda_r, checkpoint_every=0)
    lpips_fn = build_lpips().to(settings.device)
    stamps = [time.perf_counter()]

    def step_done(step: int, total: int, loss: float) -> None:
        stamps.append(time.perf_counter())  # the loss, a float, has waited for the step's kernels
        if step == steps + 1:
            raise _Enough

    if method == "ours":
        with contextlib.suppress(_Enough), _autocast(settings):
            tune_generator(G, pivots, crops, config=config, lpips_fn=lpips_fn, progress=step_done)
    else:
        tuned = copy.deepcopy(G).train(True).requires_grad_(True)
        optimizer = torch.optim.Adam(tuned.parameters(), lr=config.lr)
        with contextlib.suppress(_Enough):
            for step in range(steps + 1):
                one = slice(step % frames, step % frames + 1)
                image = tuned.synthesis(pivots[one], noise_mode="const", force_fp32=True)
                loss = (config.lambda_lpips * lpips_fn(image, crops[one]).squeeze()
                        + config.lambda_l2 * F.mse_loss(image, crops[one]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_done(step + 1, steps + 1, loss.item())
    per_step = (stamps[-1] - stamps[1]) / steps
    return {"steps": steps, "lambda_r": config.lambda_r, "warmup_seconds": round(stamps[1] - stamps[0], 4),
            "seconds_per_step": round(per_step, 4), "seconds_per_frame_seen": round(per_step / batch, 4),
            "clip_mb": round(sum(t.numel() * t.element_size() for t in (pivots, crops)) / 2**20, 1)}


def load_reference(G, path: str, *, ops: str = "native") -> Any:
    """stylegan2-ada-pytorch's ``training.networks.Generator`` from its source at ``path``, holding G's weights.

    ``ops`` "native" keeps its CUDA ops on their plain-PyTorch reference paths; "cuda" lets them build.
    Its files are not changed: what a recent Python or PyTorch lacks is filled in here, in this process.
    """
    try:
        import distutils.util  # noqa: F401  (dnnlib imports strtobool from it; Python 3.12 dropped it)
    except ImportError:
        util = types.ModuleType("distutils.util")
        util.strtobool = lambda value: int(value.lower() in ("y", "yes", "t", "true", "on", "1"))
        sys.modules["distutils"], sys.modules["distutils.util"] = types.ModuleType("distutils"), util
    sys.path.insert(0, str(path))
    from torch_utils.ops import bias_act, upfirdn2d
    from training.networks import Generator as ReferenceGenerator

    if ops == "native":
        bias_act._init = upfirdn2d._init = lambda: False
    reference = ReferenceGenerator(**G.init_kwargs)
    reference.load_state_dict(G.state_dict())
    return reference.to(next(G.parameters()).device).eval().requires_grad_(False)


def _apply_options(G, settings: Settings) -> None:
    import torch

    if settings.channels_last:
        G.synthesis.to(memory_format=torch.channels_last)
    if settings.compile:
        G.synthesis = torch.compile(G.synthesis)


def _autocast(settings: Settings) -> contextlib.AbstractContextManager:
    import torch

    if settings.dtype == "bf16":
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(fn, device: str) -> tuple[float, Any]:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def summarise(runs: list[dict[str, Any]], *, frames: int) -> list[dict[str, Any]]:
    """Per resolution: stitching seconds per frame, final boundary error and speed-ups of ours over the
    loops; PTI seconds per frame seen and speed-ups over the loops' batch-1 step; peak memory (GPU memory on
    CUDA, else RSS) of ours on the short and the long clip, and how much the part past the clip's own
    tensors grows from one to the other (1: flat). Missing measurements are None."""
    summaries = []
    def size_of(run: dict[str, Any]) -> int:  # a failed run has only its task's size
        return run.get("resolution", run.get("size"))

    for size in sorted({size_of(run) for run in runs}):
        done = [run for run in runs if size_of(run) == size and "failed" not in run]
        stitch = {run["method"]: run for run in done if run["part"] == "stitch" and run["frames"] == frames}
        pti = {(run["method"], run["batch"]): run for run in done if run["part"] == "pti" and run["frames"] == frames}
        ours_pti = {f"batch{b}": run["seconds_per_frame_seen"] for (m, b), run in sorted(pti.items()) if m == "ours"}

        def ratio(slow: float | None, fast: float | None) -> float | None:
            return round(slow / fast, 2) if slow and fast else None

        def memory(part: str) -> dict[str, Any] | None:
            ours = [run for run in done if run["part"] == part and run["method"] == "ours"]
            long = [run for run in ours if run["frames"] != frames]
            if not long:
                return None
            clips = sorted((run for run in ours if run["batch"] == long[0]["batch"]), key=lambda run: run["frames"])
            key = "peak_cuda_memory_mb" if "peak_cuda_memory_mb" in long[0] else "peak_rss_mb"
            working = [run[key] - run["clip_mb"] for run in clips]
            return {"frames": [run["frames"] for run in clips], "peak_mb": [run[key] for run in clips],
                    "clip_mb": [run["clip_mb"] for run in clips],
                    "growth_past_clip": round(working[-1] / working[0], 3) if len(clips) > 1 else None}

        seconds = {m: stitch[m]["seconds_per_frame"] if m in stitch else None for m in METHODS}
        pti_loops = {m: pti[(m, 1)]["seconds_per_frame_seen"] if (m, 1) in pti else None
                     for m in ("naive", "reference")}
        summaries.append({
            "resolution": size,
            "stitch_seconds_per_frame": seconds,
            "stitch_boundary_error_after": {m: stitch[m]["boundary_error_after"] if m in stitch else None
                                            for m in METHODS},
            "stitch_speedup": {f"{loop}/{ours}": ratio(seconds[loop], seconds[ours])
                               for loop in ("naive", "reference") for ours in ("ours", "ours-batch1")},
            "stitch_memory_by_frames": memory("stitch"),
            "pti_seconds_per_frame_seen": {**ours_pti, **pti_loops},
            "pti_speedup": {f"{loop}/{batch}": ratio(pti_loops[loop], seconds_seen)
                            for loop in pti_loops for batch, seconds_seen in ours_pti.items()},
            "pti_memory_by_frames": memory("pti"),
        })
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default: 64 256 (cpu), 256 1024 (cuda)")
    parser.add_argument("--channels", choices=list(CHANNELS), default=None, help="default: small (cpu), ffhq (cuda)")
    parser.add_argument("--frames", type=int, default=8, help="the clip's frames")
    parser.add_argument("--steps", type=int, default=5, help="stitching steps per frame (the paper: 100)")
    parser.add_argument("--batch", type=int, default=8, help="frames stitched at once by ours")
    parser.add_argument("--loss", choices=["l1", "l2"], default="l1", help="stitching's distance (the paper: l1)")
    parser.add_argument("--long-frames", type=int, default=32, help="the long clip's frames, for memory (0: none)")
    parser.add_argument("--pti-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--pti-steps", type=int, default=3)
    parser.add_argument("--pti-lambda-r", type=float, default=0.0, help="the locality regulariser's weight")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--parts", nargs="+", choices=["stitch", "pti"], default=["stitch", "pti"])
    parser.add_argument("--reference", default=os.environ.get("STITCHTIME_REFERENCE"),
                        help="stylegan2-ada-pytorch's source folder (default: $STITCHTIME_REFERENCE)")
    parser.add_argument("--reference-ops", choices=["native", "cuda"], default="native")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(device=args.device, channels=args.channels or ("small" if args.device == "cpu" else "ffhq"),
                        steps=args.steps, loss=args.loss, pti_steps=args.pti_steps, pti_lambda_r=args.pti_lambda_r,
                        reference=args.reference, reference_ops=args.reference_ops, dtype=args.dtype,
                        channels_last=args.channels_last, compile=args.compile)
    if args.child is not None:
        task = json.loads(args.child)
        settings = Settings(**task.pop("settings"))
        print(json.dumps(measure(**task, settings=settings)))
        return
    methods = list(args.methods)
    if "reference" in methods and not args.reference:
        print(SKIPPED_REFERENCE)
        methods.remove("reference")
    long_clips = [args.long_frames] if args.long_frames and "ours" in methods else []
    tasks = []
    for size in args.sizes or ([64, 256] if args.device == "cpu" else [256, 1024]):
        if "stitch" in args.parts:
            tasks += [dict(part="stitch", size=size, method=m, frames=args.frames,
                           batch=args.batch if m == "ours" else 1) for m in methods]
            tasks += [dict(part="stitch", size=size, method="ours", frames=n, batch=args.batch) for n in long_clips]
        if "pti" in args.parts:
            if "ours" in methods:
                tasks += [dict(part="pti", size=size, method="ours", frames=args.frames, batch=b)
                          for b in args.pti_batches]
            tasks += [dict(part="pti", size=size, method="ours", frames=n, batch=args.pti_batches[0])
                      for n in long_clips]
            tasks += [dict(part="pti", size=size, method=m, frames=args.frames, batch=1)
                      for m in ("naive", "reference") if m in methods]
    runs = [{**task, **run_child([sys.executable, __file__, "--child",
                                  json.dumps({**task, "settings": dataclasses.asdict(settings)})], keep_going=True)}
            for task in tasks]
    write_report(args.out or Path(__file__).parent / "results" / f"method-{args.device}.json",
                 "Stitching tuning and PTI per frame, ours against the reference code's loops at identical settings",
                 runs, settings=dataclasses.asdict(settings), summary=summarise(runs, frames=args.frames))
    if any("failed" in run for run in runs):
        sys.exit("some measurements failed: see their 'failed' entries")


if __name__ == "__main__":
    main()
