"""rosinality/stylegan2-pytorch generator weights under stylegan2-ada-pytorch names.

e4e (``e4e_ffhq_encode.pt``) stores its decoder as rosinality's ``Generator``: the keys after
``decoder.``. Both implementations compute the same network (StyleGAN2 config F, 'skip' generator),
so the conversion is a fixed renaming plus reshapes:

=====================================  ===========================================  =================
rosinality                             ada (ours)                                   change
=====================================  ===========================================  =================
``style.{i}.weight/bias`` (i = 1..n)   ``mapping.fc{i-1}.weight/bias``              -
``input.input``                        ``synthesis.b4.const``                       [1,C,4,4]→[C,4,4]
``conv1.*``                            ``synthesis.b4.conv1.*``                     see StyledConv
``to_rgb1.*``                          ``synthesis.b4.torgb.*``                     see ToRGB
``convs.{2j}.*``, ``convs.{2j+1}.*``   ``synthesis.b{2^(j+3)}.conv0.*``, ``.conv1.*``
``to_rgbs.{j}.*``                      ``synthesis.b{2^(j+3)}.torgb.*``
``noises.noise_{k}``                   ``noise_const`` of the k-th synthesis layer  [1,1,r,r]→[r,r]
StyledConv ``conv.weight``             ``weight``                                   [1,O,I,k,k]→[O,I,k,k]
StyledConv ``conv.modulation.*``       ``affine.*``                                 -
StyledConv ``noise.weight``            ``noise_strength``                           [1]→[]
StyledConv ``activate.bias``           ``bias``                                     -
StyledConv ``conv.blur.kernel``        ``conv0.resample_filter``                    ÷ 4
ToRGB ``conv.weight/modulation.*``     ``torgb.weight/affine.*``                    [1,3,I,1,1]→[3,I,1,1]
ToRGB ``bias``                         ``torgb.bias``                               [1,3,1,1]→[3]
ToRGB ``upsample.kernel``              ``b{res}.resample_filter``                   ÷ 4
=====================================  ===========================================  =================

Why no other change is needed (checked numerically in tests/core/test_rosinality.py):

- Scales: rosinality multiplies conv weights by 1/sqrt(fan_in) before modulating; ada does not, but
  demodulation divides the scale out again. For ToRGB (no demodulation) both scale the styles by
  1/sqrt(in_channels). EqualLinear(lr_mul) and ada's FullyConnectedLayer(lr_multiplier) apply the same
  gains to weight and bias, so the stored values are interchangeable.
- Upsampling conv: both run ``conv_transpose2d`` with the stored kernel unflipped (ada passes
  ``flip_weight=False`` for ``up=2``, which its wrapper turns into no flip for a transposed conv),
  followed by the same blur with the same padding, so the kernel is NOT flipped.
- Filters: rosinality stores blur kernels already multiplied by the upsampling gain (factor² = 4);
  ada stores the normalised filter and applies the gain when filtering, hence the division by 4.
- ada has filter buffers rosinality lacks (``b4.resample_filter`` and every ``conv1.resample_filter``,
  which ada registers but never uses): they are filled with the same normalised filter. ``mapping.w_avg``
  (ada's truncation centre) has no counterpart either: pass e4e's ``latent_avg`` as ``w_avg``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

UPSAMPLE_GAIN = 4.0
"""rosinality's Blur/Upsample kernels carry the 2x upsampling gain (factor ** 2)."""

DEFAULT_FILTER = (1.0, 3.0, 3.0, 1.0)


def _resolutions(img_resolution: int) -> list[int]:
    log2 = int(math.log2(img_resolution)) if img_resolution > 0 else 0
    if img_resolution < 4 or 2 ** log2 != img_resolution:
        raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
    return [2 ** i for i in range(2, log2 + 1)]


def _normalised_filter(kernels: list[torch.Tensor]) -> torch.Tensor:
    if kernels:
        return kernels[0] / UPSAMPLE_GAIN
    f = torch.tensor(DEFAULT_FILTER)
    f = f.ger(f)
    return f / f.sum()


def ada_state_from_rosinality(state: dict[str, torch.Tensor], *, img_resolution: int,
                              w_avg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Rename and reshape a rosinality ``Generator`` state dict into our (ada's) generator's names.

    Args:
        state: rosinality's ``Generator.state_dict()`` (for e4e: the ``decoder.`` entries with that
            prefix removed). Every key must be consumed exactly once.
        img_resolution: the generator's output size (``size`` in rosinality), e.g. 1024.
        w_avg: [w_dim] ada's ``mapping.w_avg`` (e4e's ``latent_avg`` row); zeros when None, which only
            matters for truncation.

    Returns:
        A complete state dict for ``Generator(**ada_generator_kwargs_from_rosinality(...))``, to load
        with ``strict=True``. Tensors are new (the input is not modified).

    Raises:
        ValueError: keys are missing or left over for this resolution, or shapes are not rosinality's.
    """
    resolutions = _resolutions(img_resolution)
    remaining = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str, shape: list[int | None] | None = None) -> torch.Tensor:
        if name not in remaining:
            raise ValueError(f"rosinality state has no {name!r} (expected for img_resolution={img_resolution})")
        t = remaining.pop(name)
        if shape is not None and (t.ndim != len(shape) or any(s is not None and s != d
                                                             for s, d in zip(shape, t.shape))):
            raise ValueError(f"rosinality {name} has shape {list(t.shape)}, expected {shape} (None: any)")
        return t.detach().clone()

    # Mapping: style.0 is PixelNorm (no weights), style.1..n are EqualLinear layers.
    mlp = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"style\.(\d+)\.weight", k)))
    if mlp != list(range(1, len(mlp) + 1)) or not mlp:
        raise ValueError(f"rosinality mapping layers must be style.1..style.n, got indices {mlp}")
    for i in mlp:
        out[f"mapping.fc{i - 1}.weight"] = take(f"style.{i}.weight", [None, None])
        out[f"mapping.fc{i - 1}.bias"] = take(f"style.{i}.bias", [None])
    w_dim = out[f"mapping.fc{mlp[-1] - 1}.weight"].shape[0]

    blur_kernels: list[torch.Tensor] = []

    def styled_conv(src: str, dst: str, noise_index: int, upsample: bool) -> None:
        out[f"{dst}.weight"] = take(f"{src}.conv.weight", [1, None, None, None, None])[0]
        out[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight", [None, w_dim])
        out[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias", [None])
        out[f"{dst}.noise_strength"] = take(f"{src}.noise.weight", [1]).reshape([])
        out[f"{dst}.bias"] = take(f"{src}.activate.bias", [None])
        out[f"{dst}.noise_const"] = take(f"noises.noise_{noise_index}", [1, 1, None, None])[0, 0]
        if upsample:
            kernel = take(f"{src}.conv.blur.kernel", [None, None])
            blur_kernels.append(kernel)
            out[f"{dst}.resample_filter"] = kernel / UPSAMPLE_GAIN

    def to_rgb(src: str, dst: str, upsample_into: str | None) -> None:
        out[f"{dst}.weight"] = take(f"{src}.conv.weight", [1, None, None, 1, 1])[0]
        out[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight", [None, w_dim])
        out[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias", [None])
        out[f"{dst}.bias"] = take(f"{src}.bias", [1, None, 1, 1]).flatten()
        if upsample_into is not None:
            kernel = take(f"{src}.upsample.kernel", [None, None])
            blur_kernels.append(kernel)
            out[upsample_into] = kernel / UPSAMPLE_GAIN

    out["synthesis.b4.const"] = take("input.input", [1, None, 4, 4])[0]
    styled_conv("conv1", "synthesis.b4.conv1", 0, upsample=False)
    to_rgb("to_rgb1", "synthesis.b4.torgb", None)
    for j, res in enumerate(resolutions[1:]):
        block = f"synthesis.b{res}"
        styled_conv(f"convs.{2 * j}", f"{block}.conv0", 2 * j + 1, upsample=True)
        styled_conv(f"convs.{2 * j + 1}", f"{block}.conv1", 2 * j + 2, upsample=False)
        to_rgb(f"to_rgbs.{j}", f"{block}.torgb", upsample_into=f"{block}.resample_filter")

    if remaining:
        raise ValueError(f"rosinality state has {len(remaining)} keys that a {img_resolution}px generator does "
                         f"not have: {', '.join(sorted(remaining)[:8])}")

    # Buffers ada registers that rosinality has no counterpart for.
    unused_filter = _normalised_filter(blur_kernels)
    out["synthesis.b4.resample_filter"] = unused_filter.clone()
    for res in resolutions:
        out[f"synthesis.b{res}.conv1.resample_filter"] = unused_filter.clone()
    if w_avg is None:
        w_avg = torch.zeros([w_dim])
    elif list(w_avg.shape) != [w_dim]:
        raise ValueError(f"w_avg must have shape [{w_dim}], got {list(w_avg.shape)}")
    out["mapping.w_avg"] = w_avg.detach().clone()
    return out


def ada_generator_kwargs_from_rosinality(state: dict[str, torch.Tensor], *, img_resolution: int,
                                         lr_multiplier: float = 0.01) -> dict[str, Any]:
    """Our ``Generator``'s arguments for a rosinality generator's weights.

    The channel counts are read from the weights and expressed as ada's ``channel_base`` /
    ``channel_max`` (rosinality's FFHQ table with ``channel_multiplier=2`` is ada's 32768 / 512).
    rosinality runs in float32 without clamping, hence ``num_fp16_res=0`` and ``conv_clamp=None``.

    Args:
        state: rosinality's ``Generator.state_dict()``.
        img_resolution: the output size.
        lr_multiplier: rosinality's ``lr_mlp`` (not stored in the weights; 0.01 in e4e and by default).

    Raises:
        ValueError: the channel counts cannot be written as ``min(channel_base // res, channel_max)``.
    """
    resolutions = _resolutions(img_resolution)
    mlp = [k for k in state if re.fullmatch(r"style\.\d+\.weight", k)]
    if "style.1.weight" not in state or "input.input" not in state:
        raise ValueError("not a rosinality generator state dict (no style.1.weight or input.input)")
    w_dim = state["style.1.weight"].shape[1]
    channels = {4: state["input.input"].shape[1]}
    for j, res in enumerate(resolutions[1:]):
        if f"convs.{2 * j}.conv.weight" not in state:
            raise ValueError(f"rosinality state has no convs.{2 * j}.conv.weight (needed at {img_resolution}px)")
        channels[res] = state[f"convs.{2 * j}.conv.weight"].shape[1]
    channel_max = channels[4]
    below_max = [res for res in resolutions if channels[res] < channel_max]
    channel_base = channels[below_max[0]] * below_max[0] if below_max else channel_max * img_resolution
    if any(min(channel_base // res, channel_max) != channels[res] for res in resolutions):
        raise ValueError(f"channel counts {channels} do not follow min(channel_base // res, channel_max)")
    return dict(z_dim=w_dim, c_dim=0, w_dim=w_dim, img_resolution=img_resolution, img_channels=3,
                mapping_kwargs=dict(num_layers=len(mlp), lr_multiplier=lr_multiplier),
                synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=0,
                                      conv_clamp=None))
