"""Latent edits: e_i = G(w_i + δw; θ_p) (paper section 3.3), and where δw comes from.

A direction is [num_ws, w_dim]. It comes from a name the model profile provides, from the
generator's closed-form (SeFa) directions (``sefa:K``), or from a ``.npy``/``.pt`` file holding a
[w_dim], [1, w_dim] or [num_ws, w_dim] array. A generator whose W+ is not StyleGAN2's (MobileStyleGAN's
23 styles) also takes StyleGAN2's [18, w_dim] files, each of its styles reading the StyleGAN2 entry that
plays the same part (``G.stylegan2_layers``).

Strength conventions: an InterFaceGAN-style [w_dim] or [1, w_dim] direction, and a per-layer
[num_ws, w_dim] one, move every pivot by ``strength * direction``. A [num_ws, w_dim] file whose rows
are all equal is the reference code's layout (STIT's ``editings/w_directions/*.npy``); STIT takes
its first row and applies ``factor / 2`` of it, and so do we, so ``--edit age=4`` gives the same
edit as STIT's ``--edit_range 4 4 1``. STIT reads any other file the same way, its first row halved (a
per-layer file with unequal rows moves every layer by row 0); ``editing.halve_files`` "all" (the ``stit-code``
preset) does so as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stitchtime_core.errors import InputError
from stitchtime_core.models.registry import direction_kind
from stitchtime_core.models.stylegan2 import Generator
from stitchtime_core.models.torch_files import load_failure_reason, read_tensors_file


def sefa_directions(G: Generator) -> torch.Tensor:
    """Closed-form semantic directions (Shen & Zhou, SeFa) of a generator.

    The eigenvectors of AᵀA, where A stacks every synthesis layer's style affine weight with its
    rows normalised, sorted by eigenvalue, largest first.

    Returns:
        [w_dim, num_ws, w_dim]: direction k applied to every layer of W+, each row of unit norm.
    """
    with torch.no_grad():
        A = G.style_affine_weights().detach().to(torch.float64).cpu()  # [channels, w_dim]
        A = A / A.norm(dim=1, keepdim=True)
        eigenvalues, eigenvectors = torch.linalg.eigh(A.T @ A)
        order = torch.argsort(eigenvalues, descending=True)
        dirs = eigenvectors[:, order].T.to(torch.float32)  # [w_dim, w_dim]
    return dirs.unsqueeze(1).repeat(1, G.num_ws, 1)


def load_direction_file(path: str | Path, *, num_ws: int, w_dim: int,
                        stylegan2_layers: tuple[int, ...] | None = None, halve: str = "equal-rows") -> torch.Tensor:
    """Read a direction from ``.npy`` or ``.pt`` without unpickling objects.

    Args:
        path: the file.
        num_ws, w_dim: the generator's W+ shape.
        stylegan2_layers: for a generator whose W+ is not StyleGAN2's, the StyleGAN2 entry each of its
            ``num_ws`` styles reads; an [18, w_dim] file is then mapped through it.
        halve: which files are halved (``EditingConfig.halve_files``): "equal-rows", only a per-layer file
            whose rows are all equal (then read as its first row, see the module docstring); "all", every one,
            read as its first row as the reference code reads it.

    Returns:
        [num_ws, w_dim].

    Raises:
        InputError: the file is missing, unreadable, or its shape fits no [num_ws, w_dim] layout.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such direction file")
    try:
        if path.suffix == ".npy":
            # The header first: np.load would take a non-.npy file for a pickle, and both its refusals of
            # pickled data advise loading it unsafely.
            if _npy_dtype(path).hasobject:
                raise InputError(path, "not a readable direction file (it holds Python objects, which are never "
                                       "unpickled; a direction is an array of numbers)")
            array = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        elif path.suffix == ".pt":
            array = read_tensors_file(path, what="a direction file")
            if not isinstance(array, torch.Tensor):
                raise InputError(path, f"holds a {type(array).__name__}, expected one tensor")
            array = array.to(torch.float32)
        else:
            raise InputError(path, "unknown direction format (expected .npy or .pt)")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise InputError(path, f"not a readable direction file ({load_failure_reason(exc)})") from None
    if not torch.isfinite(array).all():
        raise InputError(path, "direction holds NaN or infinite values")
    if array.ndim == 1:
        array = array.unsqueeze(0)
    per_layer = (num_ws,) if stylegan2_layers is None else (num_ws, 18)
    if array.ndim != 2 or array.shape[1] != w_dim or array.shape[0] not in (1, *per_layer):
        raise InputError(path, f"direction has shape {list(array.shape)}, expected [{w_dim}], [1, {w_dim}] or "
                               f"{' or '.join(f'[{n}, {w_dim}]' for n in per_layer)} for this generator")
    if halve == "all" or array.shape[0] > 1 and torch.equal(array, array[:1].expand_as(array)):
        # The reference code's layout and factor/2 convention (module docstring); "all" reads every file so.
        array = array[:1] / 2
    elif array.shape[0] == 18 and stylegan2_layers is not None:
        array = array[list(stylegan2_layers)]
    return array.expand(num_ws, w_dim).clone()


def _npy_dtype(path: Path) -> np.dtype:
    """The dtype an ``.npy`` file's header declares.

    Raises:
        InputError: the file is not an ``.npy`` file.
    """
    with open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(file)[2]
            return np.lib.format.read_array_header_2_0(file)[2]
        except ValueError:
            raise InputError(path, "not a readable direction file (not an .npy file)") from None


def resolve_direction(spec: str, *, G: Generator, named: dict[str, torch.Tensor],
                      halve: str = "equal-rows") -> torch.Tensor:
    """The direction an ``--edit`` names: a profile name, ``sefa:K`` or a file path (read with ``halve``, see
    :func:`load_direction_file`).

    Returns:
        [num_ws, w_dim] on the generator's device.
    """
    device = next(G.parameters()).device
    kind = direction_kind(spec, list(named))  # raises for an unknown name
    if kind == "named":
        return named[spec].to(device)
    if kind == "sefa":
        index = spec.split(":", 1)[1]
        if not index.isdigit() or int(index) >= G.w_dim:
            raise ValueError(f"edit {spec!r}: sefa:K needs a whole number K from 0 to {G.w_dim - 1}")
        return sefa_directions(G)[int(index)].to(device)
    return load_direction_file(spec, num_ws=G.num_ws, w_dim=G.w_dim, stylegan2_layers=G.stylegan2_layers,
                               halve=halve).to(device)


def edit_latents(pivots: torch.Tensor, directions: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Move every pivot by the sum of strength-scaled directions.

    Args:
        pivots: [frames, num_ws, w_dim].
        directions: (direction [num_ws, w_dim], strength) pairs.

    Returns:
        edited latents [frames, num_ws, w_dim].
    """
    delta = torch.zeros_like(pivots[0])
    for direction, strength in directions:
        if direction.shape != delta.shape:
            raise ValueError(f"direction shape {list(direction.shape)} does not match pivots {list(delta.shape)}")
        delta = delta + strength * direction.to(delta)
    return pivots + delta.unsqueeze(0)
