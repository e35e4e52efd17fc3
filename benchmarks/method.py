"""Benchmark: seconds per PTI step and per stitched frame, ours against the reference code's loop.

For each resolution, random weights, with the FFHQ channel layout (``--channels ffhq``; 1024 px is
exactly ffhq.pkl's network, the GPU default) or a narrower one (``small``: channel_base 4096, at most
128 channels, the CPU default; the FFHQ layout takes about 15 s per PTI step at 64 px on 2 cores),
or the tiny profile's (``tiny``, what the demo and tests run):

- PTI: seconds per optimisation step of :func:`stitchtime_core.pti.tune_generator` (LPIPS + L2 +
  locality regulariser), at batch 1 (the paper's setting) and batch 4, so also per frame seen.
- Stitching tuning at identical settings (same steps, loss, lr, masks): ours
  (:func:`stitchtime_core.stitching.stitch_frames`, ``--batch`` frames at once, each with its own
  weights) against the naive loop of the reference code (a fresh deep copy of the generator per
  frame, batch 1, ``torch.optim.Adam``). The ratio naive / ours is the speed-up per frame.

    .venv/bin/python benchmarks/method.py [--device cpu|cuda] [--sizes 64 256] [--frames 8] [--steps 5]

Each size runs in a fresh subprocess; results go to ``benchmarks/results/method-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from common import run_child, write_report


CHANNELS = {"ffhq": dict(channel_base=32768, channel_max=512), "small": dict(channel_base=4096, channel_max=128),
            "tiny": dict(channel_base=1024, channel_max=64)}
"""Channel layouts: the official network's, a narrower one for CPUs, and the tiny profile's (64 px only)."""


def measure(size: int, *, device: str, channels: str, frames: int, steps: int, batch: int, pti_steps: int) -> dict:
    import torch

    from stitchtime_core.config import PTIConfig, StitchingConfig
    from stitchtime_core.losses import build_lpips, masked_distance
    from stitchtime_core.models.stylegan2 import Generator
    from stitchtime_core.pti import tune_generator
    from stitchtime_core.stitching import render_edits, stitch_frames

    torch.manual_seed(0)
    G = Generator(512, 0, 512, size, 3, mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(**CHANNELS[channels], num_fp16_res=4, conv_clamp=256))
    G = G.to(device).eval().requires_grad_(False)
    lpips_fn = build_lpips().to(device)
    with torch.no_grad():
        w = G.mapping(torch.randn(frames, 512, device=device), truncation_psi=0.7)
        crops = G.synthesis(G.mapping(torch.randn(frames, 512, device=device), truncation_psi=0.7))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt().to(device)
    masks = (radius < size * 0.3).float().expand(frames, 1, size, size).contiguous()
    boundaries = ((radius >= size * 0.3) & (radius < size * 0.35)).float().expand(frames, 1, size, size).contiguous()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    result = {"resolution": size, "device": device, "channels": channels,
              "synthesis_parameters": sum(p.numel() for p in G.synthesis.parameters()), "frames": frames, "stitch_steps": steps, "batch": batch}
    for pti_batch in (1, 4):
        config = PTIConfig(observations_per_frame=pti_steps * pti_batch, batch_size=pti_batch)
        run = lambda: tune_generator(G, w[:1], crops[:1], config=config, lpips_fn=lpips_fn)  # noqa: E731
        run()  # warm-up
        result[f"pti_seconds_per_step_batch{pti_batch}"] = round(timed(run) / pti_steps, 4)

    config = StitchingConfig(steps=steps, batch_size=batch)
    edits = render_edits(G, w)
    stitch_frames(G, w[:batch], crops[:batch], masks[:batch], boundaries[:batch],
                  config=StitchingConfig(steps=1, batch_size=batch), edits=edits[:batch])  # warm-up
    ours = timed(lambda: stitch_frames(G, w, crops, masks, boundaries, config=config, edits=edits))

    def naive() -> None:
        for i in range(frames):
            one = slice(i, i + 1)
            synthesis = copy.deepcopy(G.synthesis).requires_grad_(True)
            optimizer = torch.optim.Adam(synthesis.parameters(), lr=config.lr)
            with torch.no_grad():
                edit = synthesis(w[one], noise_mode="const", force_fp32=True)
            for _ in range(steps):
                image = synthesis(w[one], noise_mode="const", force_fp32=True)
                loss = (masked_distance(image, crops[one], boundaries[one])
                        + config.lambda_m * masked_distance(image, edit, masks[one]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                synthesis(w[one], noise_mode="const", force_fp32=True)

    reference = timed(naive)
    result.update({
        "stitch_seconds_per_frame_ours": round(ours / frames, 4),
        "stitch_seconds_per_frame_naive": round(reference / frames, 4),
        "stitch_speedup": round(reference / ours, 2),
        "stitch_seconds_per_frame_step_ours": round(ours / frames / steps, 4),
    })
    if device == "cuda":
        result["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default: 64 256 (cpu), 256 1024 (cuda)")
    parser.add_argument("--channels", choices=list(CHANNELS), default=None, help="default: small (cpu), ffhq (cuda)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="stitching steps per frame (the paper: 100)")
    parser.add_argument("--batch", type=int, default=8, help="frames stitched at once")
    parser.add_argument("--pti-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    channels = args.channels or ("small" if args.device == "cpu" else "ffhq")
    settings = dict(device=args.device, channels=channels, frames=args.frames, steps=args.steps, batch=args.batch,
                    pti_steps=args.pti_steps)
    if args.child is not None:
        print(json.dumps(measure(args.child, **settings)))
        return
    sizes = args.sizes or ([64, 256] if args.device == "cpu" else [256, 1024])
    runs = [run_child([sys.executable, __file__, "--child", str(size)]
                      + [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]) for size in sizes]
    write_report(args.out or Path(__file__).parent / "results" / f"method-{args.device}.json",
                 "PTI step and stitching tuning per frame, ours vs the reference code's per-frame loop", runs)

if __name__ == "__main__":
    main()
