"""rosinality/stylegan2-pytorch weights (e4e's decoder) in our generator: same names, same images.

``rosinality_synthesis`` below is an independent re-implementation of rosinality's ``Generator``
forward pass, written from its ``model.py`` and ``op/upfirdn2d.py`` / ``op/fused_act.py`` (native
paths), working on a rosinality state dict directly. Our generator, loaded with the converted
weights, must draw the same images from the same W+.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stitchtime_core.models.rosinality import ada_generator_kwargs_from_rosinality, ada_state_from_rosinality
from stitchtime_core.models.stylegan2 import Generator, setup_filter

STYLE_DIM = 32
N_MLP = 3
LR_MLP = 0.01
BLUR_KERNEL = [1, 3, 3, 1]
CHANNELS = {4: 32, 8: 32, 16: 16, 32: 8}  # rosinality's table shrunk: full at low res, halving above


def make_kernel(k: list[float]) -> torch.Tensor:
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def rosinality_state(size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names and shapes of rosinality's ``Generator(size, STYLE_DIM, N_MLP)``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return offset + scale * torch.randn(shape, generator=gen)

    state: dict[str, torch.Tensor] = {}
    for i in range(1, N_MLP + 1):
        state[f"style.{i}.weight"] = randn(STYLE_DIM, STYLE_DIM) / LR_MLP
        state[f"style.{i}.bias"] = randn(STYLE_DIM, scale=10.0)

    def styled_conv(prefix: str, in_ch: int, out_ch: int, upsample: bool) -> None:
        state[f"{prefix}.conv.weight"] = randn(1, out_ch, in_ch, 3, 3)
        state[f"{prefix}.conv.modulation.weight"] = randn(in_ch, STYLE_DIM)
        state[f"{prefix}.conv.modulation.bias"] = randn(in_ch, scale=0.2, offset=1.0)
        if upsample:
            state[f"{prefix}.conv.blur.kernel"] = make_kernel(BLUR_KERNEL) * 4
        state[f"{prefix}.noise.weight"] = randn(1, scale=0.5)
        state[f"{prefix}.activate.bias"] = randn(out_ch, scale=0.5)

    def to_rgb(prefix: str, in_ch: int, upsample: bool) -> None:
        if upsample:
            state[f"{prefix}.upsample.kernel"] = make_kernel(BLUR_KERNEL) * 4
        state[f"{prefix}.conv.weight"] = randn(1, 3, in_ch, 1, 1)
        state[f"{prefix}.conv.modulation.weight"] = randn(in_ch, STYLE_DIM)
        state[f"{prefix}.conv.modulation.bias"] = randn(in_ch, scale=0.2, offset=1.0)
        state[f"{prefix}.bias"] = randn(1, 3, 1, 1, scale=0.5)

    state["input.input"] = randn(1, CHANNELS[4], 4, 4)
    styled_conv("conv1", CHANNELS[4], CHANNELS[4], upsample=False)
    to_rgb("to_rgb1", CHANNELS[4], upsample=False)
    log_size = int(math.log2(size))
    for layer_idx in range((log_size - 2) * 2 + 1):
        res = 2 ** ((layer_idx + 5) // 2)
        state[f"noises.noise_{layer_idx}"] = randn(1, 1, res, res)
    in_ch = CHANNELS[4]
    for j, i in enumerate(range(3, log_size + 1)):
        out_ch = CHANNELS[2 ** i]
        styled_conv(f"convs.{2 * j}", in_ch, out_ch, upsample=True)
        styled_conv(f"convs.{2 * j + 1}", out_ch, out_ch, upsample=False)
        to_rgb(f"to_rgbs.{j}", out_ch, upsample=True)
        in_ch = out_ch
    return state


# --- rosinality's forward pass, re-implemented ---------------------------------------------------

def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, *, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """op/upfirdn2d.py's native path (NCHW, down=1): zero-insert, pad, convolve with the flipped kernel."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    k = torch.flip(kernel, [0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, k, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.reshape(shape), 0.2) * math.sqrt(2)


def equal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, lr_mul: float,
                 activation: bool) -> torch.Tensor:
    out = F.linear(x, weight * (1 / math.sqrt(weight.shape[1])) * lr_mul)
    return fused_leaky_relu(out, bias * lr_mul) if activation else out + bias * lr_mul


def modulated_conv2d(x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str, style: torch.Tensor, *,
                     demodulate: bool, upsample: bool) -> torch.Tensor:
    batch, in_ch, height, width = x.shape
    weight = s[f"{prefix}.weight"]
    _, out_ch, _, k, _ = weight.shape
    style = equal_linear(style, s[f"{prefix}.modulation.weight"], s[f"{prefix}.modulation.bias"], lr_mul=1,
                         activation=False).view(batch, 1, in_ch, 1, 1)
    weight = (1 / math.sqrt(in_ch * k * k)) * weight * style
    if demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, out_ch, 1, 1, 1)
    if upsample:
        x = x.view(1, batch * in_ch, height, width)
        weight = weight.transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
        out = out.view(batch, out_ch, *out.shape[2:])
        kernel = s[f"{prefix}.blur.kernel"]
        p = (kernel.shape[0] - 2) - (k - 1)
        return upfirdn2d(out, kernel, pad=((p + 1) // 2 + 2 - 1, p // 2 + 1))
    weight = weight.view(batch * out_ch, in_ch, k, k)
    out = F.conv2d(x.view(1, batch * in_ch, height, width), weight, padding=k // 2, groups=batch)
    return out.view(batch, out_ch, height, width)


def styled_conv(x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str, style: torch.Tensor,
                noise: torch.Tensor, *, upsample: bool) -> torch.Tensor:
    out = modulated_conv2d(x, s, f"{prefix}.conv", style, demodulate=True, upsample=upsample)
    out = out + s[f"{prefix}.noise.weight"] * noise  # NoiseInjection
    return fused_leaky_relu(out, s[f"{prefix}.activate.bias"])  # FusedLeakyReLU


def to_rgb(x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str, style: torch.Tensor,
           skip: torch.Tensor | None) -> torch.Tensor:
    out = modulated_conv2d(x, s, f"{prefix}.conv", style, demodulate=False, upsample=False) + s[f"{prefix}.bias"]
    if skip is not None:
        kernel = s[f"{prefix}.upsample.kernel"]
        p = kernel.shape[0] - 2
        out = out + upfirdn2d(skip, kernel, up=2, pad=((p + 1) // 2 + 2 - 1, p // 2))
    return out


def rosinality_mapping(s: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    x = z * torch.rsqrt(torch.mean(z ** 2, dim=1, keepdim=True) + 1e-8)  # PixelNorm
    for i in range(1, N_MLP + 1):
        x = equal_linear(x, s[f"style.{i}.weight"], s[f"style.{i}.bias"], lr_mul=LR_MLP, activation=True)
    return x


def rosinality_synthesis(s: dict[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
    """``Generator.forward([latent], input_is_latent=True, randomize_noise=False)[0]``, latent [B, n_latent, w]."""
    noise = [s[f"noises.noise_{i}"] for i in range(sum(k.startswith("noises.") for k in s))]
    out = s["input.input"].repeat(latent.shape[0], 1, 1, 1)
    out = styled_conv(out, s, "conv1", latent[:, 0], noise[0], upsample=False)
    skip = to_rgb(out, s, "to_rgb1", latent[:, 1], None)
    i = 1
    for j in range(sum(k.endswith(".upsample.kernel") for k in s)):
        out = styled_conv(out, s, f"convs.{2 * j}", latent[:, i], noise[2 * j + 1], upsample=True)
        out = styled_conv(out, s, f"convs.{2 * j + 1}", latent[:, i + 1], noise[2 * j + 2], upsample=False)
        skip = to_rgb(out, s, f"to_rgbs.{j}", latent[:, i + 2], skip)
        i += 2
    return skip


# --- tests ---------------------------------------------------------------------------------------

def converted_generator(state: dict[str, torch.Tensor], size: int) -> Generator:
    G = Generator(**ada_generator_kwargs_from_rosinality(state, img_resolution=size))
    G.load_state_dict(ada_state_from_rosinality(state, img_resolution=size), strict=True)
    return G.eval()


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("fused_modconv", [True, False])
def test_converted_weights_draw_the_same_images(size: int, fused_modconv: bool) -> None:
    state = rosinality_state(size)
    G = converted_generator(state, size)
    n_latent = int(math.log2(size)) * 2 - 2
    latent = torch.randn([3, n_latent, STYLE_DIM], generator=torch.Generator().manual_seed(1))  # a real W+

    with torch.no_grad():
        expected = rosinality_synthesis(state, latent)
        ours = G.synthesis(latent, noise_mode="const", fused_modconv=fused_modconv)

    assert G.num_ws == n_latent
    assert ours.shape == expected.shape == (3, 3, size, size)
    assert expected.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_converted_mapping_gives_the_same_w() -> None:
    state = rosinality_state(16)
    G = converted_generator(state, 16)
    z = torch.randn([4, STYLE_DIM], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(G.mapping(z)[:, 0], rosinality_mapping(state, z), atol=1e-4, rtol=1e-4)


# What the converted seed-0 16 px generator computes: the comparisons above hold the conversion to an
# independent re-implementation; these hold both to numbers recorded once.
STORED_W = torch.tensor([[1.19212067, -0.09975188, 0.41652441, 1.93172932],
                         [0.24256402, -0.12457391, -0.23611648, 3.57990432]])
"""``mapping(z)[:, 0, :4]`` for the seed-2 z."""
STORED_PIXELS = torch.tensor([[-1.21409559, -2.49392653, -1.24099112],
                              [-4.87993431, 7.49534607, -3.90826392]])
"""``synthesis(latent)[:, :, 8, 8]`` for the seed-1 W+."""
STORED_SUM = torch.tensor(-1967.30615234)


def test_converted_generator_gives_the_stored_numbers() -> None:
    G = converted_generator(rosinality_state(16), 16)
    latent = torch.randn([2, 6, STYLE_DIM], generator=torch.Generator().manual_seed(1))
    z = torch.randn([2, STYLE_DIM], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        images = G.synthesis(latent, noise_mode="const")
        ws = G.mapping(z)
    torch.testing.assert_close(ws[:, 0, :4], STORED_W, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images[:, :, 8, 8], STORED_PIXELS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images.sum(), STORED_SUM, atol=1e-4, rtol=1e-4)


def test_every_rosinality_key_is_mapped_exactly_once() -> None:
    # Tag each source tensor with its own value, then find where every value went.
    source = {name: torch.full(t.shape, float(i + 1)) for i, (name, t) in enumerate(rosinality_state(32).items())}
    converted = ada_state_from_rosinality(source, img_resolution=32)
    derived = {"mapping.w_avg", "synthesis.b4.resample_filter"} | {
        f"synthesis.b{res}.conv1.resample_filter" for res in (4, 8, 16, 32)}
    names = list(source)
    origin = {}
    for name, t in converted.items():
        if name in derived:
            continue
        value = t.flatten()[0].item() * (4 if name.endswith("resample_filter") else 1)
        assert (t * (4 if name.endswith("resample_filter") else 1) == value).all(), name
        origin[name] = names[round(value) - 1]

    assert sorted(origin.values()) == sorted(names)  # each source key once, none left
    assert converted.keys() == Generator(**ada_generator_kwargs_from_rosinality(source, img_resolution=32)
                                         ).state_dict().keys()
    assert {k: origin[k] for k in (
        "mapping.fc0.weight", "mapping.fc2.bias", "synthesis.b4.const", "synthesis.b4.conv1.noise_strength",
        "synthesis.b4.conv1.bias", "synthesis.b4.torgb.bias", "synthesis.b8.conv0.affine.weight",
        "synthesis.b8.conv0.resample_filter", "synthesis.b8.resample_filter", "synthesis.b16.conv1.noise_const",
        "synthesis.b32.conv0.weight", "synthesis.b32.torgb.weight")} == {
        "mapping.fc0.weight": "style.1.weight", "mapping.fc2.bias": "style.3.bias",
        "synthesis.b4.const": "input.input", "synthesis.b4.conv1.noise_strength": "conv1.noise.weight",
        "synthesis.b4.conv1.bias": "conv1.activate.bias", "synthesis.b4.torgb.bias": "to_rgb1.bias",
        "synthesis.b8.conv0.affine.weight": "convs.0.conv.modulation.weight",
        "synthesis.b8.conv0.resample_filter": "convs.0.conv.blur.kernel",
        "synthesis.b8.resample_filter": "to_rgbs.0.upsample.kernel",
        "synthesis.b16.conv1.noise_const": "noises.noise_4", "synthesis.b32.conv0.weight": "convs.4.conv.weight",
        "synthesis.b32.torgb.weight": "to_rgbs.2.conv.weight",
    }


def test_shapes_change_as_ada_stores_them() -> None:
    source = rosinality_state(16)
    converted = ada_state_from_rosinality(source, img_resolution=16, w_avg=torch.ones(STYLE_DIM))
    assert converted["synthesis.b4.const"].shape == (CHANNELS[4], 4, 4)
    assert converted["synthesis.b8.conv0.weight"].shape == (CHANNELS[8], CHANNELS[4], 3, 3)
    assert converted["synthesis.b16.torgb.weight"].shape == (3, CHANNELS[16], 1, 1)
    assert converted["synthesis.b16.torgb.bias"].shape == (3,)
    assert converted["synthesis.b16.conv1.noise_strength"].shape == ()
    assert converted["synthesis.b16.conv1.noise_const"].shape == (16, 16)
    assert torch.equal(converted["synthesis.b8.conv0.resample_filter"], setup_filter(BLUR_KERNEL))
    assert torch.equal(converted["synthesis.b4.resample_filter"], setup_filter(BLUR_KERNEL))
    assert torch.equal(converted["mapping.w_avg"], torch.ones(STYLE_DIM))
    assert converted["synthesis.b4.const"].data_ptr() != source["input.input"].data_ptr()


def test_ffhq_channel_table_is_ada_default() -> None:
    # rosinality's 1024 px FFHQ table with channel_multiplier=2 (only the shapes matter here).
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    state = {"style.1.weight": torch.empty(512, 512), "input.input": torch.empty(1, 512, 4, 4)}
    for j, res in enumerate([8, 16, 32, 64, 128, 256, 512, 1024]):
        state[f"convs.{2 * j}.conv.weight"] = torch.empty(1, table[res], table[res // 2], 3, 3)
    kwargs = ada_generator_kwargs_from_rosinality(state, img_resolution=1024)
    assert kwargs["synthesis_kwargs"]["channel_base"] == 32768 and kwargs["synthesis_kwargs"]["channel_max"] == 512


def test_leftover_or_missing_keys_are_errors() -> None:
    state = rosinality_state(16)
    with pytest.raises(ValueError, match="keys that a 16px generator does not have: convs.4.conv.weight"):
        ada_state_from_rosinality({**state, "convs.4.conv.weight": torch.zeros(1)}, img_resolution=16)
    with pytest.raises(ValueError, match="keys that a 8px generator does not have"):
        ada_state_from_rosinality(state, img_resolution=8)
    with pytest.raises(ValueError, match="has no 'noises.noise_3'"):
        ada_state_from_rosinality({k: v for k, v in state.items() if k != "noises.noise_3"}, img_resolution=16)
    with pytest.raises(ValueError, match=r"to_rgb1.bias has shape \[3\], expected \[1, None, 1, 1\]"):
        ada_state_from_rosinality({**state, "to_rgb1.bias": torch.zeros(3)}, img_resolution=16)
