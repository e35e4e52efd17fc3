"""MobileStyleGAN (Belousov, 2021): a 1024 px FFHQ generator distilled from StyleGAN2, written here.

The architecture of bes-dev/MobileStyleGAN.pytorch as its OpenVINO export computes it: the mapping
network is StyleGAN2's (8 layers, read into :class:`~stitchtime_core.models.stylegan2.MappingNetwork`);
the synthesis network starts from a learned 4x4 input and a modulated 3x3 convolution, then seven
blocks each double the resolution with an inverse Haar wavelet transform (IDWT) of modulated
features, followed by two modulated depthwise-separable convolutions; the last block's 12 wavelet
channels become the 1024 px image by one more IDWT. Demodulation is fixed per channel (the
distillation trained it into the weights), so it is folded into the pointwise weights, as in the
export.

W+ has 23 styles, indexed as the reference code: the first convolution reads style 0; block i
(0-6) reads 3i+1 (upsampling and first convolution), 3i+2 (second convolution) and 3i+3 (its wavelet
head; only the last block's, style 21, reaches the image); style 22 is unused. 23 equal rows are the
mapping network's w. :data:`STYLEGAN2_LAYERS` maps StyleGAN2's 18-entry W+ onto these 23.

Noise is fixed, as in the export: each layer adds ``noise_strength * noise_const``, a constant map of
unit spread times a learned scale (the export stores their product; loading splits it), so that the
projector can optimise the maps as it does StyleGAN2's.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.errors import InputError
from stitchtime_core.models.openvino_ir import IRGraph, IRLayer, read_ir
from stitchtime_core.models.stylegan2 import MappingNetwork, _check_shape

CHANNELS = (512, 512, 512, 512, 512, 256, 128, 64)
"""Output channels of the first convolution and of blocks 0-6 (the reference's ``channels``)."""
STYLEGAN2_LAYERS = (0, *(k for i in range(6) for k in (2 * i + 1, 2 * i + 2, 2 * i + 3)), 13, 14, 17, 17)
"""For each of the 23 styles, the entry of StyleGAN2's 18-entry W+ (1024 px) that plays its part.

StyleGAN2's block at 8·2^i px reads entries 2i+1 (its upsampling convolution), 2i+2 (its second
convolution) and 2i+3 (its RGB head); its 4 px block reads entry 0. MobileStyleGAN's block i works at
the same 8·2^i px with the same three roles (3i+1, 3i+2, 3i+3), and its first convolution at 4 px
reads style 0. Its last block (512 px) ends in the wavelet head that makes the 1024 px image: style
21 takes StyleGAN2's last RGB head, entry 17; StyleGAN2's 1024 px convolutions (15, 16) have no
counterpart. Style 22 is unused and takes entry 17 too.
"""
WAVELET_CHANNELS = 12
"""A wavelet head's outputs: for each colour the low band and three high bands (LH, HL, HH)."""


def _haar_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[4, 1, 2, 2] transposed-convolution filters of the inverse Haar transform of (LL, LH, HL, HH).

    pytorch_wavelets' ``DWTInverse(wave="db1", mode="zero")``: LH varies along rows, HL along
    columns, each 1-D step scales by 1/sqrt(2).
    """
    signs = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]],
                         device=device, dtype=dtype)
    return (signs * 0.5).unsqueeze(1)


def inverse_haar(x: torch.Tensor) -> torch.Tensor:
    """One level of the inverse 2-D Haar transform.

    Args:
        x: [batch, 4C, h, w]: C low bands, then each channel's three high bands (LH, HL, HH of channel
            c at C + 3c, C + 3c + 1, C + 3c + 2).

    Returns:
        [batch, C, 2h, 2w].
    """
    batch, bands, height, width = x.shape
    channels = bands // 4
    grouped = torch.cat([x[:, :channels].unsqueeze(2), x[:, channels:].reshape(batch, channels, 3, height, width)],
                        dim=2).reshape(1, batch * bands, height, width)
    kernel = _haar_kernel(x.device, x.dtype).repeat(batch * channels, 1, 1, 1)
    out = F.conv_transpose2d(grouped, kernel, stride=2, groups=batch * channels)
    return out.reshape(batch, channels, 2 * height, 2 * width)


class Modulation(nn.Module):
    """A style's per-channel scales: ``(w @ weight.T + bias) * scale`` (an affine layer, fan-in scaled)."""

    def __init__(self, channels: int, *, w_dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.zeros([channels, w_dim]))
        self.bias = nn.Parameter(torch.ones([channels]))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Args: w [batch, w_dim]. Returns [batch, channels]."""
        styles = torch.addmm(self.bias.unsqueeze(0), w, self.weight.t())
        return styles * self.scale if self.scale != 1 else styles


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out channels-last (2-3x faster convolutions on a CPU); a no-op when it already is.

    Spelled with permutes because ``contiguous(memory_format=...)`` is not allowed under vmap.
    """
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _modulated_pointwise(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of ``x`` modulated per sample: modulating the input equals scaling the weights' columns,
    so one matrix product per sample, on channels-last pixels [batch, r*r, in].

    Args: x [batch, in, r, r], weight [out, in, 1, 1], styles [batch, in], bias [out].
    Returns: [batch, out, r, r], channels last.
    """
    batch, channels, height, width = x.shape
    weight = weight[:, :, 0, 0].unsqueeze(0) * styles.unsqueeze(1)  # [batch, out, in]
    pixels = _channels_last(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    out = torch.baddbmm(bias, pixels, weight.transpose(1, 2))
    return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


class StyledLayer(nn.Module):
    """Modulated convolution, fixed noise, bias, leaky ReLU 0.2.

    ``separable``: a 3x3 depthwise convolution (``weight_dw``) then a 1x1 pointwise one
    (``weight_permute``); otherwise one full 3x3 convolution (``weight``). Demodulation is in the
    (pointwise) weights.
    """

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, separable: bool):
        super().__init__()
        self.separable, self.resolution = separable, resolution
        self.modulation = Modulation(in_channels, w_dim=w_dim, scale=1 / math.sqrt(in_channels * 9))
        if separable:
            self.weight_dw = nn.Parameter(torch.zeros([in_channels, 1, 3, 3]))
            self.weight_permute = nn.Parameter(torch.zeros([out_channels, in_channels, 1, 1]))
        else:
            self.weight = nn.Parameter(torch.zeros([out_channels, in_channels, 3, 3]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("noise_const", torch.zeros([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str = "const") -> torch.Tensor:
        """Args: x [batch, in_channels, r, r], w [batch, w_dim]. Returns [batch, out_channels, r, r], channels last."""
        batch, _, height, width = x.shape
        styles = self.modulation(w)
        if self.separable:
            # The depthwise convolution is per channel, so the modulation can wait for the pointwise one.
            x = F.conv2d(_channels_last(x), self.weight_dw, padding=1, groups=x.shape[1])
            x = _modulated_pointwise(x, self.weight_permute, styles, self.bias)
        else:
            x = F.conv2d(x * styles[:, :, None, None], self.weight, self.bias, padding=1)
        if noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode == "random":
            noise = torch.randn([batch, 1, height, width], device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == "none":
            return F.leaky_relu(x, 0.2)
        else:
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        if torch.is_grad_enabled():  # autograd through in-place ops on a view costs more than it saves
            return F.leaky_relu(x + noise, 0.2)
        return F.leaky_relu(x.add_(noise), 0.2, inplace=True)  # the convolution's output is fresh


class WaveletUpsample(nn.Module):
    """Modulate 4C channels, read them as C low bands and C x 3 high bands, and invert the Haar transform."""

    def __init__(self, in_channels: int, *, w_dim: int):
        super().__init__()
        self.modulation = Modulation(in_channels, w_dim=w_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Args: x [batch, 4C, r, r], w [batch, w_dim]. Returns [batch, C, 2r, 2r]."""
        return inverse_haar(x * self.modulation(w)[:, :, None, None])


class SynthesisBlock(nn.Module):
    """IDWT upsampling (style 3i+1), then two depthwise-separable styled layers (3i+1, 3i+2)."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int):
        super().__init__()
        self.up = WaveletUpsample(in_channels, w_dim=w_dim)
        self.conv1 = StyledLayer(in_channels // 4, out_channels, w_dim=w_dim, resolution=resolution, separable=True)
        self.conv2 = StyledLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution, separable=True)

    def forward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, noise_mode: str) -> torch.Tensor:
        x = self.up(x, w1)
        x = self.conv1(x, w1, noise_mode=noise_mode)
        return self.conv2(x, w2, noise_mode=noise_mode)


class WaveletImage(nn.Module):
    """The last block's head: a modulated 1x1 convolution (no demodulation) to 12 wavelet channels."""

    def __init__(self, in_channels: int, *, w_dim: int):
        super().__init__()
        self.modulation = Modulation(in_channels, w_dim=w_dim, scale=1 / math.sqrt(in_channels))
        self.weight = nn.Parameter(torch.zeros([WAVELET_CHANNELS, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([WAVELET_CHANNELS]))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Args: x [batch, C, r, r], w [batch, w_dim]. Returns the image [batch, 3, 2r, 2r]."""
        return inverse_haar(_modulated_pointwise(x, self.weight, self.modulation(w), self.bias))


class MobileSynthesisNetwork(nn.Module):
    """W+ [batch, 23, 512] → image [batch, 3, 1024, 1024], roughly in [-1, 1]."""

    def __init__(self, *, w_dim: int = 512, channels: tuple[int, ...] = CHANNELS):
        super().__init__()
        self.w_dim, self.channels = w_dim, tuple(channels)
        self.num_ws = 3 * (len(channels) - 1) + 2
        self.img_resolution = 4 * 2 ** len(channels)
        self.img_channels = 3
        self.input = nn.Parameter(torch.zeros([1, channels[0], 4, 4]))
        self.conv1 = StyledLayer(channels[0], channels[0], w_dim=w_dim, resolution=4, separable=False)
        self.layers = nn.ModuleList(
            SynthesisBlock(c_in, c_out, w_dim=w_dim, resolution=8 * 2 ** i)
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])))
        self.to_img = WaveletImage(channels[-1], w_dim=w_dim)

    def forward(self, ws: torch.Tensor, *, noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool = True) -> torch.Tensor:
        """Args: ws [batch, num_ws, w_dim]; ``force_fp32`` and ``fused_modconv`` are accepted for StyleGAN2's
        signature (always fp32; the modulation is one way only).

        Returns:
            [batch, 3, img_resolution, img_resolution].
        """
        _check_shape("ws", ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = self.input.expand(ws.shape[0], -1, -1, -1)
        x = self.conv1(x, ws[:, 0], noise_mode=noise_mode)
        for i, block in enumerate(self.layers):
            x = block(x, ws[:, 3 * i + 1], ws[:, 3 * i + 2], noise_mode=noise_mode)
        return self.to_img(x, ws[:, 3 * len(self.layers)])


class MobileGenerator(nn.Module):
    """Mapping (StyleGAN2's) and MobileStyleGAN synthesis; the interface of :class:`stylegan2.Generator`."""

    def __init__(self, z_dim: int = 512, w_dim: int = 512, channels: tuple[int, ...] = CHANNELS,
                 mapping_layers: int = 8):
        super().__init__()
        self.init_kwargs: dict[str, Any] = dict(z_dim=z_dim, w_dim=w_dim, channels=list(channels),
                                                mapping_layers=mapping_layers)
        self.z_dim, self.c_dim, self.w_dim = z_dim, 0, w_dim
        self.synthesis = MobileSynthesisNetwork(w_dim=w_dim, channels=tuple(channels))
        self.num_ws, self.img_resolution, self.img_channels = (self.synthesis.num_ws, self.synthesis.img_resolution,
                                                               self.synthesis.img_channels)
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=0, w_dim=w_dim, num_ws=self.num_ws,
                                      num_layers=mapping_layers, lr_multiplier=0.01)

    stylegan2_layers = STYLEGAN2_LAYERS

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs: Any) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)

    def style_affine_weights(self) -> torch.Tensor:
        """Every modulation's weight (times its scale), stacked: [sum of channels, w_dim] (for SeFa)."""
        return torch.cat([m.weight * m.scale for m in self.synthesis.modules() if isinstance(m, Modulation)])


def load_mobile_generator(mapping_xml: str | os.PathLike, synthesis_xml: str | os.PathLike) -> MobileGenerator:
    """MobileStyleGAN from its OpenVINO export (random-face's ``MappingNetwork.xml`` and ``SynthesisNetwork.xml``,
    each with its ``.bin`` beside it), read as data (:mod:`~stitchtime_core.models.openvino_ir`).

    Raises:
        InputError: a file is missing, cut short, or not this network (naming the file and what is wrong).
    """
    G = MobileGenerator()
    G.mapping.load_state_dict(_mapping_state(read_ir(mapping_xml), G.mapping))
    G.synthesis.load_state_dict(_synthesis_state(read_ir(synthesis_xml), G.synthesis))
    return G.eval().requires_grad_(False)


def _tensor(graph: IRGraph, layer: IRLayer, shape: torch.Size) -> torch.Tensor:
    """A constant as a tensor of ``shape`` (the export keeps some as [1, C] or [C, 1, 1, 3, 3])."""
    array = graph.constant(layer)
    if array.dtype != np.float32 or array.size != math.prod(shape):
        raise InputError(graph.xml_path, f"constant {layer.port_names or layer.name!r} holds {array.size} "
                                         f"{array.dtype}, expected {list(shape)} float32: not MobileStyleGAN")
    return torch.from_numpy(array).reshape(shape)


def _mapping_state(graph: IRGraph, mapping: MappingNetwork) -> dict[str, torch.Tensor]:
    """The 8 linear layers, in graph order: weights [512, 512] and biases [512], with the fan-in and
    learning-rate scales already applied (undone here, as our layers apply them)."""
    matmuls = graph.of_type("MatMul")
    if len(matmuls) != mapping.num_layers:
        raise InputError(graph.xml_path, f"has {len(matmuls)} matrix products, a mapping network of "
                                         f"{mapping.num_layers} layers has {mapping.num_layers}: not MobileStyleGAN")
    state = {}
    for idx, matmul in enumerate(matmuls):
        layer = getattr(mapping, f"fc{idx}")
        add = next((graph.layers[i] for i in matmul.consumers if graph.layers[i].type == "Add"), None)
        bias = add and next((graph.producer(graph.layers[i], 0) for i in add.inputs
                             if graph.layers[i].type == "Reshape"), None)
        if bias is None:
            raise InputError(graph.xml_path, f"mapping layer {idx} has no bias: not MobileStyleGAN")
        state[f"fc{idx}.weight"] = _tensor(graph, graph.producer(matmul, 1), layer.weight.shape) / layer.weight_gain
        state[f"fc{idx}.bias"] = _tensor(graph, bias, layer.bias.shape) / layer.bias_gain
    state["w_avg"] = torch.zeros_like(mapping.w_avg)
    return state


def _synthesis_state(graph: IRGraph, synthesis: MobileSynthesisNetwork) -> dict[str, torch.Tensor]:
    """Our parameters from the export's named constants (``m.<reference name>``), and the unnamed noise maps
    found by the convolution whose output each is added to."""
    named = {name.removeprefix("m."): layer for name, layer in graph.named_constants().items() if name.startswith("m.")}
    renames = {"input": "input.input", "to_img.modulation.weight": "layers.6.to_img.conv.modulation.weight",
               "to_img.modulation.bias": "layers.6.to_img.conv.modulation.bias",
               "to_img.weight": "layers.6.to_img.conv.weight", "to_img.bias": "layers.6.to_img.bias"}
    state = {}
    noise_of_layer = _noise_maps(graph, named)
    for name, target in synthesis.state_dict().items():
        if name.endswith(("noise_const", "noise_strength")):
            continue
        source = renames.get(name) or _reference_name(name)
        if source not in named:
            raise InputError(graph.xml_path, f"has no constant {'m.' + source!r}: not MobileStyleGAN's synthesis")
        state[name] = _tensor(graph, named[source], target.shape)
    for name, module in synthesis.named_modules():
        if isinstance(module, StyledLayer):
            product = noise_of_layer.get(name)
            if product is None:
                raise InputError(graph.xml_path, f"has no noise map for {name}: not MobileStyleGAN's synthesis")
            product = _tensor(graph, product, module.noise_const.shape)
            strength = product.square().mean().sqrt()
            state[f"{name}.noise_const"] = product / strength if strength > 0 else product
            state[f"{name}.noise_strength"] = strength
    return state


def _reference_name(name: str) -> str:
    """Our name of a synthesis parameter → the reference's (``conv1.weight`` → ``conv1.conv.weight``)."""
    for part in (".modulation.", ".weight_dw", ".weight_permute", ".weight"):
        if part in name and ".up." not in name:
            head, _, tail = name.partition(part)
            return f"{head}.conv{part}{tail}"
    return name


def _noise_maps(graph: IRGraph, named: dict[str, IRLayer]) -> dict[str, IRLayer]:
    """Each styled layer's noise constant (a [1, 1, r, r] map added to its convolution's output)."""
    weight_names = {layer.id: name for name, layer in named.items()
                    if name.endswith(("conv.weight_permute", "conv1.conv.weight"))}
    found = {}
    for const in graph.of_type("Const"):
        if const.port_names.startswith("m.") or len(const.data.get("shape", "").split(",")) != 4:
            continue
        for add in (graph.layers[i] for i in const.consumers):
            conv = next((graph.layers[i] for i in add.inputs if graph.layers[i].type == "Convolution"), None)
            if add.type == "Add" and conv is not None and conv.inputs[1] in weight_names:
                found[weight_names[conv.inputs[1]].rsplit(".conv.", 1)[0]] = const
    return found
