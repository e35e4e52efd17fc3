"""The e4e encoder (Encoder4Editing): IR-SE50 backbone, a feature pyramid and progressive styles.

Same module and parameter names as omertov/encoder4editing's ``Encoder4Editing`` (the keys that
follow ``encoder.`` in ``e4e_ffhq_encode.pt``). ``widths`` scales the backbone for the tiny
profile; the official network uses (64, 128, 256, 512).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# IR-SE50: units per stage (get_blocks(50) in the reference).
IR50_UNITS = (3, 4, 14, 3)


class EqualLinear(nn.Module):
    """rosinality's equalised linear layer without activation (``weight``, ``bias``)."""

    def __init__(self, in_dim: int, out_dim: int, *, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 1), kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(max(channels // reduction, 1), channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """``bottleneck_IR_SE``: BN-conv-PReLU-conv-BN-SE residual unit."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)


def ir_se50_stem_and_body(widths: tuple[int, int, int, int]) -> tuple[nn.Sequential, nn.Sequential]:
    """The IR-SE50 input layer and its 24 residual units (e4e's and ArcFace's shared backbone).

    Args:
        widths: channels of the four stages (official: 64, 128, 256, 512); each stage halves the size.
    """
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                         nn.PReLU(widths[0]))
    units = []
    in_channel = widths[0]
    for depth, count in zip(widths, IR50_UNITS):
        units.append(BottleneckIRSE(in_channel, depth, 2))
        units += [BottleneckIRSE(depth, depth, 1) for _ in range(count - 1)]
        in_channel = depth
    return stem, nn.Sequential(*units)


class GradualStyleBlock(nn.Module):
    """Strided convs down to 1x1, then an equalised linear layer: one style vector."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers: list[nn.Module] = [nn.Conv2d(in_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).view(-1, self.out_c))


class Encoder4Editing(nn.Module):
    """Image → W+ codes (offsets from the average latent, which :func:`encode` adds).

    Args:
        stylegan_size: the generator's resolution; the encoder gives ``2*log2(size) - 2`` styles.
        input_size: the encoder's input resolution (256 for the official FFHQ encoder).
        widths: channels of the four backbone stages; the last is the style dimension.
    """

    coarse_ind = 3
    middle_ind = 7

    def __init__(self, *, stylegan_size: int = 1024, input_size: int = 256,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)):
        super().__init__()
        self.input_size = input_size
        self.input_layer, self.body = ir_se50_stem_and_body(widths)
        # Feature taps c1, c2, c3 after units 6, 20 and 23: the ends of stages 2, 3 and 4 (strides 4, 8, 16).
        self.taps = (IR50_UNITS[0] + IR50_UNITS[1] - 1, sum(IR50_UNITS[:3]) - 1, sum(IR50_UNITS) - 1)
        style_dim = widths[3]
        self.style_count = 2 * int(math.log2(stylegan_size)) - 2
        c3_size = input_size // 16
        self.styles = nn.ModuleList()
        for i in range(self.style_count):
            spatial = c3_size if i < self.coarse_ind else 2 * c3_size if i < self.middle_ind else 4 * c3_size
            self.styles.append(GradualStyleBlock(style_dim, style_dim, spatial))
        self.latlayer1 = nn.Conv2d(widths[2], style_dim, 1)
        self.latlayer2 = nn.Conv2d(widths[1], style_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [batch, 3, input_size, input_size] in [-1, 1]. Returns [batch, style_count, style_dim]."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"e4e input must be [batch, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}")
        x = self.input_layer(x)
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
            elif i == self.taps[2]:
                c3 = x
        w0 = self.styles[0](c3)
        w = w0.unsqueeze(1).repeat(1, self.style_count, 1)
        features = p2 = c3
        deltas = [torch.zeros_like(w0)]
        for i in range(1, self.style_count):
            if i == self.coarse_ind:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == self.middle_ind:
                features = _upsample_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](features))
        return w + torch.stack(deltas, dim=1)


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[2:], mode="bilinear", align_corners=True) + y


def encode(encoder: Encoder4Editing, crops: torch.Tensor, latent_avg: torch.Tensor, *,
           resize: str = "antialias") -> torch.Tensor:
    """W+ pivots of aligned crops, as the pSp/e4e wrapper computes them.

    Args:
        encoder: an e4e encoder in eval mode.
        crops: [batch, 3, H, W] in [-1, 1], any square size (resized to the encoder's input size).
        latent_avg: [num_ws, w_dim] or [w_dim], the average latent added to the encoder's offsets.
        resize: how crops of another size reach the input size (``EncodingConfig.resize``), see
            :func:`resize_to_input`.

    Returns:
        pivots [batch, num_ws, w_dim].
    """
    codes = encoder(resize_to_input(crops, encoder.input_size, resize=resize))
    return codes + (latent_avg if latent_avg.ndim == 2 else latent_avg.unsqueeze(0)).unsqueeze(0)


def resize_to_input(crops: torch.Tensor, size: int, *, resize: str = "antialias") -> torch.Tensor:
    """Crops brought to an encoder's square input size by bilinear resampling.

    Args:
        crops: [batch, 3, H, W] in [-1, 1].
        size: the input side in pixels.
        resize: "antialias": bilinear widened to the scale when shrinking, like the PIL resize behind
            e4e's training crops; "plain": bilinear from the 4 nearest pixels, as torchvision's
            ``Resize`` on a tensor in the reference code's torchvision (before 0.17; aliases when
            shrinking 1024 px crops to 256).

    Returns:
        [batch, 3, size, size]; ``crops`` itself when it already has that size.

    Raises:
        ValueError: an unknown ``resize``.
    """
    if resize not in ("antialias", "plain"):
        raise ValueError(f"resize must be 'antialias' or 'plain', got {resize!r}")
    if crops.shape[-2:] == (size, size):
        return crops
    return F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=resize == "antialias")
