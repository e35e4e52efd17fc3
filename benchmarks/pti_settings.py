"""Benchmark: PTI's ``regularizer_noise`` and ``frame_order``, on the real generator and a real face.

The paper is silent on both; the reference code renders the locality regulariser's images without noise
(``none``) and visits the frames in order (``fixed``); stitchtime renders them with the stored noise every
other image of the pipeline is rendered with (``const``) and shuffles each pass (``shuffled``). Each variant
tunes MobileStyleGAN (the mobile profile) around the mobile encoder's pivots of the astronaut's demo clip
(``encoder_resize.astronaut_crops``: the demo camera at 1080p, ``--frames`` frames over one second, 1024 px
crops), with the ``paper`` settings except: ``--observations`` passes instead of 80, PTI's single-image
learning rate (3e-4, as ``--quality preview``) and LPIPS at 256 px, so that a variant takes minutes on a CPU.

- ``const``, ``none``: λ_R = 0.1 with each ``regularizer_noise`` (shuffled order);
- ``no-regulariser``: λ_R = 0 (shuffled), the scale both are compared with;
- ``fixed``: λ_R = 0 in frame order, against ``no-regulariser`` for ``frame_order``.

Each is measured, every image rendered with the stored noise as edits and outputs are:

- ``reconstruction``: LPIPS (AlexNet, 256 px) of θ_p(pivot) to each crop: the mean, and the spread (the worst
  frame minus the best), which a fixed order could skew towards the frames it visits last;
- ``locality``: LPIPS and MSE of θ_p to the original generator at 16 held-out codes, each pivot moved 30 towards
  a random w (ψ 0.5) as the regulariser's codes are, drawn from another seed: what the regulariser is for;
- ``edits``: the same at the pivots edited by age ±4 and smile ±4 (the directions the product ships).

Results go to ``benchmarks/results/pti-settings-<device>.json``, a table on stdout; about 30 minutes on two
CPU cores with the defaults.

    .venv/bin/python benchmarks/pti_settings.py [--models models] [--frames 8] [--observations 10]
        [--variants const none no-regulariser fixed] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import peak_memory, write_report
from encoder_resize import astronaut_crops

from stitchtime_core.config import PTIConfig
from stitchtime_core.editing import edit_latents
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.e4e import encode
from stitchtime_core.models.profiles import load_models
from stitchtime_core.pti import locality_codes, tune_generator

VARIANTS = {
    "const": {"regularizer_noise": "const"},
    "none": {"regularizer_noise": "none"},
    "no-regulariser": {"lambda_r": 0.0},
    "fixed": {"lambda_r": 0.0, "frame_order": "fixed"},
}
LPIPS_SIZE = 256
HELD_OUT = 16
EDITS = (("age", 4.0), ("age", -4.0), ("smile", 4.0), ("smile", -4.0))


def distances(G, tuned, lpips_fn, codes: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[list, list]:
    """Per code: LPIPS (256 px) and MSE of ``tuned`` at the code to ``targets`` (default: G at the code)."""
    lp, mse = [], []
    with torch.no_grad():
        for i, code in enumerate(codes):
            moved = tuned.synthesis(code[None], noise_mode="const")
            target = G.synthesis(code[None], noise_mode="const") if targets is None else targets[i:i + 1]
            mse.append(float(F.mse_loss(moved, target)))
            small = [F.interpolate(x, size=LPIPS_SIZE, mode="area") for x in (moved, target)]
            lp.append(float(lpips_fn(*small)))
    return lp, mse


def measure(models, lpips_fn, config: PTIConfig, pivots: torch.Tensor, crops: torch.Tensor,
            held_out: torch.Tensor, edited: torch.Tensor) -> dict[str, float]:
    """Tune with ``config`` and measure the tuned generator (module docstring)."""
    G = models.generator
    started = time.perf_counter()
    tuned = tune_generator(G, pivots, crops, config=config, lpips_fn=lpips_fn).generator
    seconds = time.perf_counter() - started
    reconstruction, _ = distances(G, tuned, lpips_fn, pivots, crops)
    locality, locality_mse = distances(G, tuned, lpips_fn, held_out)
    edits, edits_mse = distances(G, tuned, lpips_fn, edited)
    return {"reconstruction": float(np.mean(reconstruction)),
            "reconstruction_spread": float(np.max(reconstruction) - np.min(reconstruction)),
            "reconstruction_per_frame": [round(x, 4) for x in reconstruction],
            "locality_lpips": float(np.mean(locality)), "locality_mse": float(np.mean(locality_mse)),
            "edits_lpips": float(np.mean(edits)), "edits_mse": float(np.mean(edits_mse)),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="the mobile profile's model folder (default: models/)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--observations", type=int, default=10, help="passes over the frames")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = load_models("mobile", models_dir=args.models)
    G = models.generator
    lpips_fn = build_lpips(backbone_path=models.lpips_backbone)
    crops = astronaut_crops(fps=args.frames)
    with torch.no_grad():
        pivots = encode(models.encoder, crops, models.latent_avg)
        codes = locality_codes(G, pivots.repeat(HELD_OUT // len(pivots) + 1, 1, 1)[:HELD_OUT], alpha=30.0, psi=0.5,
                               generator=torch.Generator().manual_seed(12345))
        edited = torch.cat([edit_latents(pivots, [(models.directions[name], strength)]) for name, strength in EDITS])
    base = PTIConfig(lr=3e-4, observations_per_frame=args.observations, lpips_resolution=LPIPS_SIZE,
                     checkpoint_every=0, checkpoint_seconds=0)
    runs = []
    for name in args.variants:
        config = dataclasses.replace(base, **VARIANTS[name])
        runs.append({"variant": name, **VARIANTS[name],
                     **measure(models, lpips_fn, config, pivots, crops, codes, edited)})
        print(f"{name}: {runs[-1]}", flush=True)
    out = args.out or Path(__file__).parent / "results" / "pti-settings-cpu.json"
    write_report(out, "pti_settings", runs, frames=args.frames, observations=args.observations,
                 base=dataclasses.asdict(base), **peak_memory("cpu"))
    print("| variant | reconstruction | spread | locality LPIPS | locality MSE | edits LPIPS | edits MSE | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['variant']} | {r['reconstruction']:.4f} | {r['reconstruction_spread']:.4f} | "
              f"{r['locality_lpips']:.4f} | {r['locality_mse']:.5f} | {r['edits_lpips']:.4f} | {r['edits_mse']:.5f} | "
              f"{r['seconds']} |")


if __name__ == "__main__":
    main()
