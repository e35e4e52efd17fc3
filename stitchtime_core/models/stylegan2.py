"""StyleGAN2 generator with the stylegan2-ada-pytorch architecture and parameter names.

Pure PyTorch: the reference implementation's CUDA kernels (bias_act, upfirdn2d) are replaced by
their reference paths, so the same module runs on a CPU and a GPU and reads the official
``G_ema`` state dict key for key. Build with the ``init_kwargs`` of a pickle, then
``load_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LRELU_GAIN = math.sqrt(2.0)


def _check_shape(name: str, x: torch.Tensor, shape: list[int | None]) -> None:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {shape} (None: any), got {list(x.shape)}")


def bias_act(x: torch.Tensor, b: torch.Tensor | None, *, act: str = "linear", gain: float | None = None,
             clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """Bias, then activation, then gain, then clamp: the reference path of ada's bias_act op."""
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
        gain = LRELU_GAIN if gain is None else gain
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}")
    if gain is not None and gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(f: list[float]) -> torch.Tensor:
    """A separable FIR filter as a normalised 2-D kernel (the reference ``setup_filter``)."""
    f = torch.as_tensor(f, dtype=torch.float32)
    f = f.ger(f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, *, up: int = 1, padding: tuple[int, int, int, int] = (0, 0, 0, 0),
              gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad, then convolve with the 2-D FIR filter ``f``.

    Args:
        x: [batch, channels, height, width].
        f: [fh, fw] filter.
        up: integer upsampling factor.
        padding: (x0, x1, y0, y1), negative values crop.
        gain: overall gain; the filter is scaled by ``gain ** (f.ndim / 2)`` as the reference does.
    """
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])
    f = f[None, None].repeat(channels, 1, 1, 1)
    return F.conv2d(x, f, groups=channels)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Upsample ``x`` by ``up`` with the FIR filter ``f`` (keeps the image centred)."""
    fw = f.shape[-1]
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None, *, up: int = 1, padding: int = 0,
                    groups: int = 1, flip_weight: bool = True) -> torch.Tensor:
    """2-D convolution with optional 2x upsampling, as ada's ``conv2d_resample`` (no downsampling)."""
    out_channels, in_per_group, kh, kw = w.shape
    if up == 1:
        if not flip_weight:
            w = w.flip([2, 3])
        return F.conv2d(x, w, padding=padding, groups=groups)
    # Upsampling: a transposed strided convolution, then the FIR filter.
    fw = f.shape[-1]
    p0 = padding + (fw + up - 1) // 2 - (kw - 1)
    p1 = padding + (fw - up) // 2 - (kw - up)
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    if flip_weight:  # conv_transpose2d flips by itself; the reference asks for the opposite here.
        w = w.flip([2, 3])
    x = F.conv_transpose2d(x, w, stride=up, groups=groups)
    return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=up * up)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, noise: torch.Tensor | None = None,
                     up: int = 1, padding: int = 0, resample_filter: torch.Tensor | None = None,
                     demodulate: bool = True, flip_weight: bool = True, fused_modconv: bool = True) -> torch.Tensor:
    """StyleGAN2's modulated convolution.

    Args:
        x: [batch, in_channels, height, width].
        weight: [out_channels, in_channels, kh, kw].
        styles: [batch, in_channels].
        fused_modconv: run per-sample weights as one grouped convolution (fast for inference and for
            small batches); otherwise scale activations, which is cheaper when training a batch.
    """
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    _check_shape("styles", styles, [batch, in_channels])
    if x.dtype == torch.float16 and demodulate:  # pre-normalise to avoid fp16 overflow, as the reference
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # [batch, out, in, kh, kw]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None  # [batch, out]
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        return x if noise is None else x + noise.to(x.dtype)
    if dcoefs is not None:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw).to(x.dtype)
    x = conv2d_resample(x, w, resample_filter, up=up, padding=padding, groups=batch, flip_weight=flip_weight)
    x = x.reshape(batch, -1, *x.shape[2:])
    return x if noise is None else x + noise.to(x.dtype)


class FullyConnectedLayer(nn.Module):
    """Equalised-learning-rate linear layer (``weight``, ``bias``)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, in_features]
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z → w, with ``w_avg`` tracked for truncation (``fc0`` … ``fc{num_layers-1}``, ``embed``)."""

    def __init__(self, *, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = (w_dim if embed_features is None else embed_features) if c_dim > 0 else 0
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_w_avg: bool = False) -> torch.Tensor:
        """Args: z [batch, z_dim], c [batch, c_dim] or None. Returns ws [batch, num_ws, w_dim]."""
        x = None
        if self.z_dim > 0:
            _check_shape("z", z, [None, self.z_dim])
            z = z.to(torch.float32)
            x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        if self.c_dim > 0:
            y = self.embed(c.to(torch.float32))
            y = y * (y.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_w_avg and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x[:, :cutoff] = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution with noise, bias and leaky ReLU (``affine``, ``weight``, ``noise_const``…)."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: list[float] = (1, 3, 3, 1), conv_clamp: float | None = None):
        super().__init__()
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise_mode: str = "const", fused_modconv: bool = True,
                gain: float = 1.0) -> torch.Tensor:
        """Args: x [batch, in_channels, r/up, r/up], w [batch, w_dim]. Returns [batch, out_channels, r, r]."""
        _check_shape("x", x, [None, self.weight.shape[1], self.resolution // self.up, self.resolution // self.up])
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode not in ("none", "random", "const"):
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=LRELU_GAIN * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to RGB, without demodulation."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the 'skip' architecture: [const |] conv0 (up 2x), conv1, torgb."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter: list[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None, use_fp16: bool = False, fp16_channels_last: bool = False,
                 **layer_kwargs: Any):
        super().__init__()
        if architecture != "skip":
            raise ValueError(f"only the 'skip' synthesis architecture is supported, got {architecture!r}")
        self.in_channels, self.resolution, self.is_last, self.use_fp16 = in_channels, resolution, is_last, use_fp16
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.num_conv = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_torgb = 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, *,
                force_fp32: bool = False, fused_modconv: bool | None = None,
                noise_mode: str = "const") -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ws [batch, num_conv + num_torgb, w_dim]. Returns (features, img [batch, C, r, r] float32)."""
        w_iter = iter(ws.unbind(dim=1))
        # Half precision only where the reference uses it and only on a GPU: CPU fp16 convs are slow.
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and ws.device.type == "cuda" else torch.float32
        if fused_modconv is None:
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = x.to(dtype)
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, noise_mode=noise_mode)
        x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, noise_mode=noise_mode)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """W+ → image, blocks ``b4`` … ``b{img_resolution}``."""

    def __init__(self, *, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, **block_kwargs: Any):
        super().__init__()
        log2 = int(np.log2(img_resolution))
        if img_resolution < 4 or 2 ** log2 != img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=(res == img_resolution),
                                   use_fp16=(res >= fp16_resolution), **block_kwargs)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last block's torgb

    def forward(self, ws: torch.Tensor, *, noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        """Args: ws [batch, num_ws, w_dim]. Returns images [batch, img_channels, res, res], roughly in [-1, 1]."""
        _check_shape("ws", ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, force_fp32=force_fp32, fused_modconv=fused_modconv,
                           noise_mode=noise_mode)
        return img


class Generator(nn.Module):
    """The stylegan2-ada-pytorch ``Generator``: same constructor arguments, names and shapes."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict[str, Any] | None = None, synthesis_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                img_channels=img_channels, mapping_kwargs=dict(mapping_kwargs or {}),
                                synthesis_kwargs=dict(synthesis_kwargs or {}))
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))

    stylegan2_layers = None
    """Which entry of a StyleGAN2 W+ each style reads: None, this is StyleGAN2's own W+."""

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs: Any) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)

    def style_affine_weights(self) -> torch.Tensor:
        """Every synthesis layer's style affine weight, stacked: [sum of in_channels, w_dim] (for SeFa)."""
        weights = [m.weight * m.weight_gain for name, m in self.synthesis.named_modules()
                   if name.endswith("affine") and isinstance(m, FullyConnectedLayer)]
        return torch.cat(weights, dim=0)
