"""Benchmark: generator forward and forward+backward time per image, and peak memory.

``--generator stylegan2``: resolutions 64, 256 and 1024 px with the FFHQ channel layout (channel_base
32768, max 512; the 1024 px network is exactly ffhq.pkl's; ``--channels`` for another), random weights,
at each of ``--batches`` (default 1). On a GPU (``--device cuda``) the reference's fp16 resolutions are
used; on the CPU everything runs in fp32. Measured options: ``--dtype bf16`` (autocast), ``--channels-last``
(the synthesis weights' memory format), ``--compile`` (``torch.compile`` of the synthesis network); the
first, warm-up call of forward and of forward+backward (with ``--compile``: compiling) is timed apart.

``--generator mobile``: the mobile profile's MobileStyleGAN (1024 px, the real weights from
``--models``), at each of ``--batches``; on a CPU also the OpenVINO runtime's forward pass on the same
files (fp32), when ``openvino`` is installed.

    .venv/bin/python benchmarks/generator.py [--device cpu|cuda] [--sizes 64 256 1024] [--batches 1]
        [--dtype fp32|bf16] [--channels-last] [--compile] [--out FILE]
    .venv/bin/python benchmarks/generator.py --generator mobile [--batches 1 4] [--models models]

On a CPU, malloc keeps the memory torch frees, as in the pipeline (``STITCHTIME_KEEP_FREED_MEMORY=0``: not).
Each size and batch runs in a fresh subprocess so that its peak memory (RSS; on CUDA also the GPU's) is
its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from common import CHANNELS, peak_memory, run_child, write_report


def measure(size: int, device: str, repeats: int, generator: str = "stylegan2", batch: int = 1,
            models: Path | None = None, channels: str = "ffhq", dtype: str = "fp32", channels_last: bool = False,
            compile: bool = False) -> dict:
    import torch

    from stitchtime_core.malloc import keep_freed_memory
    from stitchtime_core.models.mobile import load_mobile_generator
    from stitchtime_core.models.stylegan2 import Generator

    kept = device == "cpu" and keep_freed_memory()  # as the pipeline's stages run on a CPU
    torch.manual_seed(0)
    if generator == "mobile":
        G = load_mobile_generator(models / "mobilestylegan" / "MappingNetwork.xml",
                                  models / "mobilestylegan" / "SynthesisNetwork.xml")
    else:
        G = Generator(512, 0, 512, size, 3, mapping_kwargs=dict(num_layers=8),
                      synthesis_kwargs=dict(**CHANNELS[channels], num_fp16_res=4, conv_clamp=256))
    G = G.to(device).eval().requires_grad_(False)
    ws = G.mapping(torch.randn(batch, 512, device=device))
    if channels_last:
        G.synthesis.to(memory_format=torch.channels_last)
    if compile:
        G.synthesis = torch.compile(G.synthesis)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, float]:
        """(the warm-up call's seconds, seconds per image after it)."""
        sync()
        start = time.perf_counter()
        fn()
        sync()
        warmup, start = time.perf_counter() - start, time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return warmup, (time.perf_counter() - start) / repeats / batch

    def forward_backward() -> None:
        with autocast:
            loss = G.synthesis(ws, noise_mode="const").float().square().mean()
        loss.backward()

    with torch.no_grad(), autocast:
        forward_warmup, forward = timed(lambda: G.synthesis(ws, noise_mode="const"))
    G.synthesis.train().requires_grad_(True)
    backward_warmup, backward = timed(forward_backward)
    result = {
        "generator": generator, "resolution": G.img_resolution, "batch": batch, "device": device,
        "parameters": sum(p.numel() for p in G.parameters()),
        **({"channels": channels} if generator == "stylegan2" else {}),
        "dtype": dtype, "channels_last": channels_last, "compile": compile, "malloc_keeps_freed_memory": kept,
        "forward_seconds_per_image": round(forward, 4),
        "forward_backward_seconds_per_image": round(backward, 4),
        "warmup_seconds": {"forward": round(forward_warmup, 4), "forward_backward": round(backward_warmup, 4)},
        **peak_memory(device),
    }
    if generator == "mobile" and device == "cpu" and batch == 1:
        result["openvino_forward_seconds_per_image"] = _openvino_forward(models, ws[:1, 0].numpy(), repeats)
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return result


def _openvino_forward(models: Path, w, repeats: int) -> float | None:
    """The OpenVINO runtime's synthesis time on the same IR files, fp32 (None without openvino)."""
    try:
        import openvino
    except ImportError:
        return None
    core = openvino.Core()
    network = core.compile_model(core.read_model(models / "mobilestylegan" / "SynthesisNetwork.xml"), "CPU",
                                 {"INFERENCE_PRECISION_HINT": "f32"})
    network(w)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        network(w)
    return round((time.perf_counter() - start) / repeats, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="stylegan2", choices=["stylegan2", "mobile"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="stylegan2 only")
    parser.add_argument("--channels", choices=list(CHANNELS), default="ffhq", help="stylegan2 only")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 (stylegan2), 1 4 (mobile)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the mobile profile's files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        size, batch = args.child
        print(json.dumps(measure(size, args.device, args.repeats, args.generator, batch, args.models, args.channels,
                                 args.dtype, args.channels_last, args.compile)))
        return
    common = ["--device", args.device, "--repeats", str(args.repeats), "--generator", args.generator,
              "--models", str(args.models), "--channels", args.channels, "--dtype", args.dtype]
    common += [flag for flag, on in (("--channels-last", args.channels_last), ("--compile", args.compile)) if on]
    if args.generator == "mobile":
        runs = [run_child([sys.executable, __file__, "--child", "1024", str(batch), *common], keep_going=True)
                for batch in args.batches or [1, 4]]
        title = "MobileStyleGAN synthesis (real weights), 1024 px"
    else:
        runs = [run_child([sys.executable, __file__, "--child", str(size), str(batch), *common], keep_going=True)
                for size in args.sizes for batch in args.batches or [1]]
        title = f"StyleGAN2 synthesis, {args.channels} channel layout"
    suffix = "-mobile" if args.generator == "mobile" else ""
    write_report(args.out or Path(__file__).parent / "results" / f"generator{suffix}-{args.device}.json", title, runs)
    if any("failed" in run for run in runs):
        sys.exit("some measurements failed: see their 'failed' entries")


if __name__ == "__main__":
    main()
