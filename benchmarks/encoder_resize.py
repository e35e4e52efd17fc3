"""Benchmark: how the encoder's input is resized (``encoding.resize``), antialiased or plain bilinear.

The reference code brings each 1024 px crop to e4e's 256 px with torchvision's tensor ``Resize``, which
(torchvision 0.11) does not antialias: each output pixel reads the 4 nearest of 16 input pixels. stitchtime
antialiases, as the PIL resize e4e was trained behind does. No official e4e is available here, so this
measures the mobile profile's encoder (trained here behind an antialiased resize, as e4e was), on:

- ``generated``: faces MobileStyleGAN draws at 1024 px from known w (ψ 0.7): full detail at the crop's
  size, as a face filling a 1080p or 4K frame gives, with the true pivot known. Per face: the encoder's
  error in W (|ŵ − w|), the reconstruction LPIPS (AlexNet, 256 px) of G(ŵ) to the face, and how far ŵ moves
  when the face moves by a fraction of a pixel (the face translated by 0.25, 0.5 and 0.75 px with a
  Lanczos filter): a motion that small should move the pivot about as little, and aliasing turns it into
  pivot flicker that PTI and stitching must then absorb.
- ``astronaut``: the demo's real face, filmed by its moving camera (``sample_clip.camera_matrices``,
  1920x1080, 25 fps, 1 s), detected, aligned and cropped at 1024 px as the pipeline does: the mean change of
  the pivot from frame to frame, and the reconstruction LPIPS on a few frames.

Results go to ``benchmarks/results/encoder-resize-<device>.json`` with a table on stdout; about 5 minutes on
two CPU cores (most of it the generator's 1024 px renders).

    .venv/bin/python benchmarks/encoder_resize.py [--models models] [--faces 12] [--device cpu]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F

from common import write_report

from stitchtime_core import alignment, faces, sample_clip
from stitchtime_core.config import AlignmentConfig
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.e4e import encode
from stitchtime_core.models.profiles import load_models
from stitchtime_core.tensors import images_to_tensor

RESIZES = ("antialias", "plain")
SHIFTS = (0.25, 0.5, 0.75)
"""Sub-pixel translations of the generated faces, in 1024 px crop pixels (along x and y together)."""
LPIPS_SIZE = 256


def shifted(images: torch.Tensor, shift: float) -> torch.Tensor:
    """[n, 3, H, W] images translated by ``shift`` pixels right and down (Lanczos, edges replicated)."""
    matrix = np.float32([[1, 0, shift], [0, 1, shift]])
    out = [cv2.warpAffine(image.permute(1, 2, 0).numpy(), matrix, image.shape[-1:] * 2, flags=cv2.INTER_LANCZOS4,
                          borderMode=cv2.BORDER_REPLICATE) for image in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def reconstruction(G, lpips_fn, pivots: torch.Tensor, images: torch.Tensor) -> list[float]:
    """LPIPS of G(pivot) to each image, both area-downsampled to 256 px."""
    out = []
    with torch.no_grad():
        for w, image in zip(pivots, images):
            drawn = F.interpolate(G.synthesis(w[None]), size=LPIPS_SIZE, mode="area")
            out.append(float(lpips_fn(drawn, F.interpolate(image[None], size=LPIPS_SIZE, mode="area"))))
    return out


def generated(models, lpips_fn, count: int, seed: int) -> dict[str, dict[str, float]]:
    """The ``generated`` measurements per resize (module docstring)."""
    G, encoder = models.generator, models.encoder
    with torch.no_grad():
        z = torch.randn([count, G.z_dim], generator=torch.Generator().manual_seed(seed))
        w = G.mapping(z, truncation_psi=0.7)  # [n, num_ws, w_dim], equal rows
        images = torch.cat([G.synthesis(w[i:i + 1]).clamp(-1, 1) for i in range(count)])
        result = {}
        for resize in RESIZES:
            pivots = encode(encoder, images, models.latent_avg, resize=resize)
            moves = {shift: float((encode(encoder, shifted(images, shift), models.latent_avg, resize=resize)
                                   - pivots)[:, 0].norm(dim=-1).mean()) for shift in SHIFTS}
            result[resize] = {
                "w_error": float((pivots - w)[:, 0].norm(dim=-1).mean()),
                "lpips": float(np.mean(reconstruction(G, lpips_fn, pivots, images))),
                **{f"move_at_{shift}px": value for shift, value in moves.items()},
                "w_spread": float((w - w.mean(0))[:, 0].norm(dim=-1).mean()),  # the scale |ŵ − w| compares to
            }
    return result


def astronaut_crops(seconds: float = 1.0, fps: int = 25, size: tuple[int, int] = (1920, 1080)) -> torch.Tensor:
    """The demo's camera on the astronaut at ``size``, aligned and cropped at 1024 px: [n, 3, 1024, 1024]."""
    photo = skimage.data.astronaut()
    matrices = sample_clip.camera_matrices(round(seconds * fps), fps=Fraction(fps), size=size)
    frames = [sample_clip.render_frame(photo, m, size) for m in matrices]
    landmarker = faces.load_landmarker()
    landmarks = np.stack([landmarker.detect(f)[0][1] for f in frames])  # the largest face: the only one
    quads, _, _ = alignment.track_quads(landmarks, np.ones(len(frames), bool), config=AlignmentConfig(), fps=fps)
    return images_to_tensor(np.stack([alignment.crop(f, q, 1024) for f, q in zip(frames, quads)]))


def astronaut(models, lpips_fn) -> dict[str, dict[str, float]]:
    """The ``astronaut`` measurements per resize (module docstring)."""
    crops = astronaut_crops()
    result = {}
    with torch.no_grad():
        for resize in RESIZES:
            pivots = torch.cat([encode(models.encoder, crops[i:i + 8], models.latent_avg, resize=resize)
                                for i in range(0, len(crops), 8)])
            result[resize] = {
                "frame_to_frame": float(pivots[1:, 0].sub(pivots[:-1, 0]).norm(dim=-1).mean()),
                "lpips": float(np.mean(reconstruction(models.generator, lpips_fn, pivots[::8], crops[::8]))),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="the mobile profile's model folder (default: models/)")
    parser.add_argument("--faces", type=int, default=12, help="generated faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="the encoder and generator run on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    models = load_models("mobile", models_dir=args.models)
    lpips_fn = build_lpips(backbone_path=models.lpips_backbone)
    runs = [{"clip": "generated", **generated(models, lpips_fn, args.faces, args.seed)},
            {"clip": "astronaut", **astronaut(models, lpips_fn)}]
    out = args.out or Path(__file__).parent / "results" / f"encoder-resize-{args.device}.json"
    write_report(out, "encoder_resize", runs, faces=args.faces, seed=args.seed,
                 seconds=round(time.perf_counter() - started, 1))
    print("| clip | measure | antialias | plain |\n| --- | --- | --- | --- |")
    for run in runs:
        for measure in run["antialias"]:
            print(f"| {run['clip']} | {measure} | {run['antialias'][measure]:.4f} | {run['plain'][measure]:.4f} |")


if __name__ == "__main__":
    main()
