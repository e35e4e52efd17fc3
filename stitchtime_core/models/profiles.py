"""Model profiles: which generator, encoder and perceptual loss a run uses.

``tiny``: the real architectures (stylegan2-ada generator, e4e encoder) at 64 px with small channel
counts and seeded random weights, built in, so every test and the demo run on a CPU. ``ffhq``: the
official pretrained files from a models folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stitchtime_core.editing import sefa_directions
from stitchtime_core.config import PTIConfig, RunConfig, StitchingConfig
from stitchtime_core.errors import InputError
from stitchtime_core.models.e4e import Encoder4Editing
from stitchtime_core.models.stylegan2 import Generator

PROFILES = ("tiny", "ffhq")

TINY_GENERATOR_KWARGS: dict[str, Any] = dict(
    z_dim=64, c_dim=0, w_dim=64, img_resolution=64, img_channels=3,
    mapping_kwargs=dict(num_layers=4), synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0),
)
TINY_ENCODER_KWARGS: dict[str, Any] = dict(stylegan_size=64, input_size=64, widths=(16, 32, 64, 64))
TINY_SEED = 2022
TINY_DIRECTION_SCALE = 0.2

FFHQ_FILES = {
    "generator": ("ffhq.pkl", "the stylegan2-ada-pytorch FFHQ generator (PTI's ffhq.pkl)"),
    "encoder": ("e4e_ffhq_encode.pt", "the e4e FFHQ encoder (omertov/encoder4editing)"),
}


@dataclass
class Models:
    """The networks of one profile, frozen and in eval mode, on one device.

    Attributes:
        generator: the original StyleGAN2 generator (never modified; PTI tunes a copy).
        encoder: the e4e encoder.
        latent_avg: [num_ws, w_dim] average latent added to the encoder's output.
        identity: a short string that changes whenever any weight changes (used in artifact keys).
        directions: named edit directions the profile provides, each [num_ws, w_dim].
    """

    profile: str
    generator: Generator
    encoder: Encoder4Editing
    latent_avg: torch.Tensor
    identity: str
    directions: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return self.generator.img_resolution


def profile_defaults(profile: str) -> RunConfig:
    """The run config a profile starts from: the paper's values, except where ``tiny`` needs its own.

    The tiny networks start from random weights, so PTI needs a larger learning rate and batches to
    fit the frames within a CPU-minute, and stitching tuning takes fewer steps (at the paper's learning
    rate: a larger one blurs the face it should keep). The run's config file records the values used.
    """
    if profile == "ffhq":
        return RunConfig()
    if profile == "tiny":
        return RunConfig(
            pti=PTIConfig(lr=1e-2, observations_per_frame=32, batch_size=4),
            stitching=StitchingConfig(steps=25),
        )
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")


def build_tiny(device: torch.device | str = "cpu") -> Models:
    """The tiny profile: seeded random weights, identical on every machine."""
    gen = torch.Generator().manual_seed(TINY_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        G = Generator(**TINY_GENERATOR_KWARGS)
        E = Encoder4Editing(**TINY_ENCODER_KWARGS)
    with torch.no_grad():
        z = torch.randn([4096, G.z_dim], generator=gen)
        w_avg = G.mapping(z)[:, 0].mean(dim=0)
        G.mapping.w_avg.copy_(w_avg)
    latent_avg = w_avg.unsqueeze(0).repeat(G.num_ws, 1)
    models = Models("tiny", G, E, latent_avg, identity="", directions={})
    models.identity = _weights_identity(models)
    # Stand-ins for the FFHQ directions: the tiny generator's strongest closed-form directions, scaled
    # so that strengths of 1-3 change the face visibly and keep it recognisable, as FFHQ's do.
    sefa = sefa_directions(G) * TINY_DIRECTION_SCALE
    models.directions = {"age": sefa[0], "smile": sefa[1], "pose": sefa[2]}
    return _to_device(models, device)


def load_models(profile: str, *, models_dir: str | os.PathLike | None = None,
                device: torch.device | str = "cpu") -> Models:
    """Build the networks of a profile and load their weights.

    Raises:
        InputError: a file the profile needs is missing, naming it and how to get it.
    """
    if profile == "tiny":
        return build_tiny(device)
    if profile == "ffhq":
        folder = Path(models_dir or os.environ.get("STITCHTIME_MODELS", "models"))
        for role, (name, what) in FFHQ_FILES.items():
            if not (folder / name).is_file():
                raise InputError(folder / name, f"missing {role} weights ({what}); put the official file in "
                                                f"{folder} or point --models / STITCHTIME_MODELS at the folder")
        raise InputError(folder, "reading the official ffhq files is not implemented yet (issue 4); "
                                 "use --profile tiny")
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")


def generator_config(G: Generator) -> dict[str, Any]:
    """The JSON architecture config of a generator, to save beside its safetensors weights."""
    return json.loads(json.dumps(G.init_kwargs))


def _weights_identity(models: Models) -> str:
    h = hashlib.sha256(models.profile.encode())
    for module in (models.generator, models.encoder):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_device(models: Models, device: torch.device | str) -> Models:
    models.generator = models.generator.to(device).eval().requires_grad_(False)
    models.encoder = models.encoder.to(device).eval().requires_grad_(False)
    models.latent_avg = models.latent_avg.to(device)
    models.directions = {k: v.to(device) for k, v in models.directions.items()}
    return models
