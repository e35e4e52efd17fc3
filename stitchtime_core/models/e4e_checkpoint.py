"""Reading e4e checkpoints (``e4e_ffhq_encode.pt``) without unpickling arbitrary objects.

The official file is what encoder4editing's training coach saves: ``{"state_dict": pSp state dict
("encoder.*" and "decoder.*"), "opts": vars(options), "latent_avg": [18, 512]}``. It is read with
``torch.load(weights_only=True)``, which accepts tensors and plain data only, so a file carrying
any other object is refused instead of run. The encoder's widths and input size are read off the
weights, so a smaller file with the same structure loads the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from stitchtime_core.errors import InputError
from stitchtime_core.models.e4e import IR50_UNITS, Encoder4Editing
from stitchtime_core.models.torch_files import read_tensors_file


@dataclass
class E4ECheckpoint:
    encoder: Encoder4Editing
    """The encoder with the checkpoint's weights, in eval mode."""
    latent_avg: torch.Tensor
    """[num_ws, w_dim]: the average latent the encoder's offsets are added to."""
    opts: dict[str, Any]
    """The training options saved with the checkpoint."""


def load_e4e_checkpoint(path: str | os.PathLike) -> E4ECheckpoint:
    """Build the e4e encoder of a checkpoint and load its weights.

    Raises:
        InputError: the file is missing, unreadable, holds non-plain objects, or is not an e4e
            checkpoint (names what is missing).
    """
    data = read_tensors_file(path, what="an e4e checkpoint")
    if not isinstance(data, dict) or "state_dict" not in data:
        found = f"a dict with keys {sorted(data)[:5]}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise InputError(path, f"is not an e4e checkpoint: expected a dict with 'state_dict', found {found}")
    state = data["state_dict"]
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    if "input_layer.0.weight" not in encoder_state or "styles.0.linear.weight" not in encoder_state:
        raise InputError(path, "is not an e4e checkpoint: its state_dict has no encoder.input_layer / "
                               "encoder.styles weights")
    opts = dict(data.get("opts") or {})
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":
        raise InputError(path, f"holds a {opts['encoder_type']} encoder, not Encoder4Editing")
    style_count = len({k.split(".")[1] for k in encoder_state if k.startswith("styles.")})
    stylegan_size = 2 ** ((style_count + 2) // 2)
    # Stage widths: the depth of each stage's first unit. Input size: style 0 halves c3 down to 1x1.
    firsts = [sum(IR50_UNITS[:i]) for i in range(4)]
    widths = tuple(int(encoder_state[f"body.{i}.res_layer.1.weight"].shape[0]) for i in firsts)
    style0_convs = sum(1 for k in encoder_state if k.startswith("styles.0.convs.") and k.endswith(".weight"))
    input_size = 16 * 2 ** style0_convs
    encoder = Encoder4Editing(stylegan_size=stylegan_size, input_size=input_size, widths=widths)
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"e4e encoder weights do not fit the architecture: {_first_line(exc)}") from None
    latent_avg = data.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor):
        raise InputError(path, "has no latent_avg (the average latent e4e adds to its output)")
    if latent_avg.ndim == 1:
        latent_avg = latent_avg.unsqueeze(0).repeat(style_count, 1)
    if tuple(latent_avg.shape) != (style_count, widths[3]):
        raise InputError(path, f"latent_avg has shape {list(latent_avg.shape)}, expected [{style_count}, {widths[3]}]")
    return E4ECheckpoint(encoder.eval(), latent_avg.float(), opts)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:2])

