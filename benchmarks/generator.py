"""Benchmark: StyleGAN2 generator forward and forward+backward time per image, and peak memory.

Resolutions 64, 256 and 1024 px with the FFHQ channel layout (channel_base 32768, max 512; the
1024 px network is exactly ffhq.pkl's), random weights. On a GPU (``--device cuda``) the
reference's fp16 resolutions are used; on the CPU everything runs in fp32.

    .venv/bin/python benchmarks/generator.py [--device cpu|cuda] [--sizes 64 256 1024] [--out FILE]

Each size runs in a fresh subprocess so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common import run_child, write_report


def measure(size: int, device: str, repeats: int) -> dict:
    import torch

    from stitchtime_core.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(512, 0, 512, size, 3, mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))
    G = G.to(device).eval().requires_grad_(False)
    ws = G.mapping(torch.randn(1, 512, device=device))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        forward = timed(lambda: G.synthesis(ws, noise_mode="const"))
    G.synthesis.train().requires_grad_(True)
    backward = timed(lambda: G.synthesis(ws, noise_mode="const").square().mean().backward())
    result = {
        "resolution": size, "device": device, "parameters": sum(p.numel() for p in G.parameters()),
        "forward_seconds_per_image": round(forward, 4),
        "forward_backward_seconds_per_image": round(backward, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device == "cuda":
        result["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.device, args.repeats)))
        return
    runs = [run_child([sys.executable, __file__, "--child", str(size), "--device", args.device,
                       "--repeats", str(args.repeats)]) for size in args.sizes]
    write_report(args.out or Path(__file__).parent / "results" / f"generator-{args.device}.json",
                 "StyleGAN2 synthesis, batch 1, FFHQ channel layout", runs)

if __name__ == "__main__":
    main()
