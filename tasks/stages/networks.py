"""The networks stages use, each loaded when a stage first uses it, once per process, and shared by every stage
of every run in it. The stages' keys need none: a profile's identity comes from its files' digests."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from stitchtime_core.config import on_gpu
from stitchtime_core.identity import IdentityNet, load_arcface_identity, load_dlib_identity
from stitchtime_core.editing import resolve_direction
from stitchtime_core.losses import build_lpips
from stitchtime_core.malloc import keep_freed_memory
from stitchtime_core.models.profiles import Networks
from stitchtime_core.models.registry import default_models_dir

ARCFACE_FILE = "model_ir_se50.pth"
"""With the ffhq profile, identity is measured with ArcFace when this file is in the models folder."""


@functools.lru_cache(maxsize=2)
def stage_models(profile: str, models_dir: str | None, device: str) -> Networks:
    """A profile's networks, each loaded on first use (see :class:`~stitchtime_core.models.profiles.Networks`).

    A process that loads networks computes with torch: on a CPU, from here on malloc keeps the memory torch
    frees (:func:`~stitchtime_core.malloc.keep_freed_memory`)."""
    if not on_gpu(device):
        keep_freed_memory()
    return Networks(profile, models_dir, device)


@functools.lru_cache(maxsize=2)
def lpips(profile: str, models_dir: str | None, device: str) -> torch.nn.Module:
    """LPIPS with the profile's AlexNet trunk."""
    return build_lpips(backbone_path=stage_models(profile, models_dir, device).lpips_backbone).to(device)


@functools.lru_cache(maxsize=2)
def identity_network(profile: str, models_dir: str | None, device: str) -> IdentityNet:
    """ArcFace IR-SE50 when the ffhq profile's models folder holds :data:`ARCFACE_FILE`; dlib's ResNet otherwise."""
    arcface = Path(models_dir or default_models_dir(), ARCFACE_FILE)
    if profile == "ffhq" and arcface.is_file():
        return load_arcface_identity(arcface, device=device)
    return load_dlib_identity()


@dataclass(frozen=True)
class Runtime:
    """Where a run's stages compute: the profile, its models folder and the device. Stages take it whole;
    the networks it names are loaded once per process, each when a stage first uses it."""

    profile: str
    models_dir: str | None = None
    device: str = "cpu"

    @property
    def networks(self) -> Networks:
        """The profile's networks on the device (the keys of stages need only their ``identity``)."""
        return stage_models(self.profile, self.models_dir, self.device)

    @property
    def lpips(self) -> torch.nn.Module:
        return lpips(self.profile, self.models_dir, self.device)

    @property
    def identity_network(self) -> IdentityNet:
        return identity_network(self.profile, self.models_dir, self.device)


def resolve_edits(runtime: Runtime, edits: tuple[tuple[str, float], ...], *,
                  halve: str = "equal-rows") -> list[tuple[torch.Tensor, float]]:
    """Each edit's direction tensor and strength. The flow calls it before any stage, so a typo fails
    before hours of tuning, not after; the edit stage calls it for the directions it applies.

    Raises:
        ValueError: an unknown direction name or a bad ``sefa:K``.
        InputError: a direction file that is missing or unreadable.
    """
    models = runtime.networks
    return [(resolve_direction(name, G=models.generator, named=models.directions, halve=halve), strength)
            for name, strength in edits]

