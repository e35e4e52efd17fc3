"""Reading torch weight files safely: ``torch.load(weights_only=True)`` only, with clear errors.

A file that needs any object beyond tensors and plain data to unpickle is refused unread, so a
model file can never run code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stitchtime_core.errors import InputError


def read_tensors_file(path: str | os.PathLike, *, what: str) -> Any:
    """``torch.load`` of tensors and plain data only; every failure is one :class:`InputError`.

    Args:
        path: the file.
        what: how errors name the expected content, e.g. "an e4e checkpoint".
    """
    if not Path(path).is_file():
        raise InputError(path, f"no such file (expected {what})")
    with open(path, "rb") as file:
        head = file.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save's zip, or a legacy pickle
        raise InputError(path, f"is not a torch file{' (it is empty)' if not head else ''}, so it is not {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is not usable
        raise InputError(path, f"cannot be read as a tensors-only torch file ({load_failure_reason(exc)}), "
                               f"so it is not {what}") from None


def load_state_dict_file(path: str | os.PathLike, net: nn.Module, *, what: str) -> None:
    """Read a ``torch.save``-d plain state dict, tensors only, and load it into ``net`` strictly.

    BatchNorm's ``num_batches_tracked`` counters may be absent (PyTorch before 0.4.1 did not
    write them); they do not affect inference. Every other key must be present with the
    network's shape, and no key may be left over.

    Args:
        path: the file.
        net: the built network; its parameters and buffers are overwritten.
        what: how errors name the expected content, e.g. "a BiSeNet face-parsing state dict".

    Raises:
        InputError: the file is missing or unreadable, holds something other than a dict of
            tensors (a pickle that needs code to run is refused unread), or its keys or shapes
            differ from the network's.
    """
    state = read_tensors_file(path, what=what)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(path, f"is not {what} (it holds a {type(state).__name__}, not a dict of tensors)")
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        raise InputError(path, f"is not {what} ({'; '.join(parts)})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(path, f"is not {what} ({key} holds a {type(value).__name__}, not a tensor)")
        if value.shape != expected[key].shape:
            raise InputError(path, f"is not {what} ({key} has shape {list(value.shape)}, "
                                   f"the network needs {list(expected[key].shape)})")
    full = {k: state.get(k, expected[k]) for k in expected}
    net.load_state_dict(full, strict=True)


_TORCH_ADVICE = (
    r"Weights only load failed\..*?trusted source\.",  # the advice to load the file unsafely
    r"Please use `torch\.serialization\.add_safe_globals.*?(?=\n\n|$)",
    r"Check the documentation of torch\.load.*?\.html\.?",
)


def load_failure_reason(exc: Exception) -> str:
    """The reason in torch.load's error, without its advice to load the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    for advice in _TORCH_ADVICE:
        text = re.sub(advice, " ", text, flags=re.S)
    reason = " ".join(text.split()).rstrip(".")
    return f"{exc.__class__.__name__}: {reason}" if reason else exc.__class__.__name__


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" … and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
