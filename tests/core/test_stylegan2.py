"""The StyleGAN2 generator: the official FFHQ architecture and names, and the behaviour of its parts."""

from __future__ import annotations

import copy

import pytest
import torch

from stitchtime_core.models.profiles import Models
from stitchtime_core.models.stylegan2 import (
    Generator,
    SynthesisLayer,
    SynthesisNetwork,
    setup_filter,
    upsample2d,
)

# The official stylegan2-ada-pytorch FFHQ 1024 generator (PTI's ffhq.pkl): G_ema's init_kwargs.
FFHQ_KWARGS = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                   mapping_kwargs=dict(num_layers=8),
                   synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))

# A sample of G_ema's state dict: names and shapes as in the official pickle.
FFHQ_STATE_SHAPES = {
    "mapping.fc0.weight": [512, 512],
    "mapping.fc0.bias": [512],
    "mapping.fc7.weight": [512, 512],
    "mapping.w_avg": [512],
    "synthesis.b4.const": [512, 4, 4],
    "synthesis.b4.resample_filter": [4, 4],
    "synthesis.b4.conv1.weight": [512, 512, 3, 3],
    "synthesis.b4.conv1.affine.weight": [512, 512],
    "synthesis.b4.conv1.affine.bias": [512],
    "synthesis.b4.conv1.noise_const": [4, 4],
    "synthesis.b4.conv1.noise_strength": [],
    "synthesis.b4.conv1.bias": [512],
    "synthesis.b4.torgb.weight": [3, 512, 1, 1],
    "synthesis.b4.torgb.bias": [3],
    "synthesis.b8.conv0.weight": [512, 512, 3, 3],
    "synthesis.b8.conv0.noise_const": [8, 8],
    "synthesis.b8.conv0.resample_filter": [4, 4],
    "synthesis.b64.resample_filter": [4, 4],
    "synthesis.b1024.conv0.weight": [32, 64, 3, 3],
    "synthesis.b1024.conv0.affine.weight": [64, 512],
    "synthesis.b1024.conv1.weight": [32, 32, 3, 3],
    "synthesis.b1024.conv1.noise_const": [1024, 1024],
    "synthesis.b1024.torgb.weight": [3, 32, 1, 1],
    "synthesis.b1024.torgb.affine.weight": [32, 512],
}

# Recorded from build_tiny() (torch 2.15 on an x86-64 CPU): a guard against silent architecture changes.
# ws = G.mapping(z), z = torch.randn([2, 64]) from torch.Generator().manual_seed(0).
TINY_WS_SLICE = torch.tensor([[-0.284306, 0.400459, 0.697212, -0.324490],
                              [0.507262, -0.121601, 1.267501, -0.068717]])  # ws[:, 0, :4]
TINY_IMAGE_SLICE = torch.tensor([  # G.synthesis(ws)[:, :, 32, 30:33]
    [[-2.175166, -2.205665, -2.265237], [0.185382, 0.242126, 0.267163], [0.663619, 0.646985, 0.621498]],
    [[-0.358569, -0.334433, -0.317401], [-1.617878, -1.460646, -1.301481], [-2.003869, -2.300719, -2.597921]],
])


@pytest.fixture(scope="module")
def ffhq_generator() -> Generator:
    with torch.device("meta"):
        return Generator(**FFHQ_KWARGS)


@pytest.fixture(scope="module")
def noisy_generator(tiny: Models) -> Generator:
    """A copy of the tiny generator whose noise inputs matter (its noise strengths start at 0)."""
    G = copy.deepcopy(tiny.generator)
    with torch.no_grad():
        for module in G.synthesis.modules():
            if isinstance(module, SynthesisLayer):
                module.noise_strength.fill_(0.3)
    return G


def _seeded_ws(G: Generator, batch: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z)


def test_ffhq_config_has_the_official_parameter_count_and_names(ffhq_generator):
    G = ffhq_generator
    assert sum(p.numel() for p in G.parameters()) == 30_370_060
    assert G.num_ws == 18
    state = G.state_dict()
    assert len(state) == 182
    assert {name: list(state[name].shape) for name in FFHQ_STATE_SHAPES if name in state} == FFHQ_STATE_SHAPES
    assert [f"b{r}" for r in G.synthesis.block_resolutions] == [f"b{2 ** i}" for i in range(2, 11)]
    # num_fp16_res=4: the four highest resolutions run in half precision (on a GPU).
    assert [r for r in G.synthesis.block_resolutions if getattr(G.synthesis, f"b{r}").use_fp16] == [128, 256, 512, 1024]
    assert G.synthesis.b1024.conv1.conv_clamp == 256


def test_tiny_generator_output_matches_stored_numbers(tiny):
    G = tiny.generator
    ws = _seeded_ws(G, 2)
    with torch.no_grad():
        images = G.synthesis(ws)
    assert images.shape == (2, 3, 64, 64)
    assert torch.allclose(ws[:, 0, :4], TINY_WS_SLICE, atol=1e-4)
    assert torch.allclose(images[:, :, 32, 30:33], TINY_IMAGE_SLICE, atol=1e-4)


def test_fused_and_unfused_modulated_conv_give_the_same_images(noisy_generator):
    G = copy.deepcopy(noisy_generator)
    ws = _seeded_ws(G, 3, seed=1)
    with torch.no_grad():
        fused = G.synthesis(ws, fused_modconv=True)
        unfused = G.synthesis(ws, fused_modconv=False)
        eval_default = G.eval().synthesis(ws)  # eval, float32: fused by default
        train_default = G.train().synthesis(ws)  # training: unfused by default
    assert (fused - unfused).abs().max() < 1e-4
    assert torch.equal(eval_default, fused)
    assert torch.equal(train_default, unfused)
    # Batch elements stay independent in the grouped (fused) convolution.
    with torch.no_grad():
        single = G.eval().synthesis(ws[1:2], fused_modconv=True)
    assert (single - fused[1:2]).abs().max() < 1e-4


def test_noise_modes(noisy_generator):
    G = noisy_generator
    ws = _seeded_ws(G, 2, seed=2)
    with torch.no_grad():
        const = G.synthesis(ws, noise_mode="const")
        const_again = G.synthesis(ws, noise_mode="const")
        random = G.synthesis(ws, noise_mode="random")
        random_again = G.synthesis(ws, noise_mode="random")
        none = G.synthesis(ws, noise_mode="none")
    assert torch.equal(const, const_again)
    assert (random - random_again).abs().mean() > 0.1
    assert (random - const).abs().mean() > 0.1
    assert (none - const).abs().mean() > 0.1
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="loud")


def test_zero_noise_strength_makes_noise_modes_agree(tiny):
    # The tiny generator keeps the official initialisation: noise strengths 0.
    ws = _seeded_ws(tiny.generator, 1, seed=3)
    with torch.no_grad():
        images = [tiny.generator.synthesis(ws, noise_mode=mode) for mode in ("const", "random", "none")]
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def test_truncation(tiny):
    G = tiny.generator
    z = torch.randn([3, G.z_dim], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = G.mapping(z)
        average = G.mapping(z, truncation_psi=0)
        half = G.mapping(z, truncation_psi=0.5)
        cut = G.mapping(z, truncation_psi=0, truncation_cutoff=4)
    assert torch.allclose(average, G.mapping.w_avg.expand_as(average), atol=1e-6)
    assert torch.allclose(half, G.mapping.w_avg + 0.5 * (full - G.mapping.w_avg), atol=1e-5)
    assert torch.allclose(cut[:, :4], average[:, :4]) and torch.equal(cut[:, 4:], full[:, 4:])
    # Every layer of an untruncated code is the same w.
    assert torch.equal(full, full[:, :1].expand_as(full))


@pytest.mark.parametrize("shape", [[2, 9, 64], [2, 10, 32], [10, 64], [2, 11, 64]])
def test_wrong_ws_shape_raises(tiny, shape):
    with pytest.raises(ValueError, match="ws must have shape"):
        tiny.generator.synthesis(torch.zeros(shape))


def test_wrong_z_shape_raises(tiny):
    with pytest.raises(ValueError, match="z must have shape"):
        tiny.generator.mapping(torch.zeros([2, 63]))


def test_resolution_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        SynthesisNetwork(w_dim=8, img_resolution=48, img_channels=3, channel_base=64, channel_max=8)


def test_upsample2d_keeps_a_constant_image_constant():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and torch.isclose(f.sum(), torch.tensor(1.0))
    x = torch.full([1, 2, 8, 8], 3.7)
    y = upsample2d(x, f)
    assert y.shape == (1, 2, 16, 16)
    # Away from the zero-padded border the normalised filter neither gains nor loses brightness.
    assert torch.allclose(y[:, :, 2:-2, 2:-2], torch.full_like(y[:, :, 2:-2, 2:-2], 3.7), atol=1e-5)


def test_upsample2d_keeps_the_image_centred():
    f = setup_filter([1, 3, 3, 1])
    x = torch.zeros([1, 1, 8, 8])
    x[..., 3:5, 3:5] = 1.0  # a centred square
    y = upsample2d(x, f)[0, 0]
    assert torch.allclose(y, y.flip(0), atol=1e-6) and torch.allclose(y, y.flip(1), atol=1e-6)
    assert torch.isclose(y.sum(), 4 * x.sum())  # gain up² keeps the mean


def test_style_affine_weights_stack_every_synthesis_affine(tiny):
    G = tiny.generator
    affines = [m for name, m in G.synthesis.named_modules() if name.endswith("affine")]
    A = G.style_affine_weights()
    # 2 layers per block but b4's single conv, plus a torgb per block: num_ws + blocks - 1 affines.
    assert len(affines) == G.num_ws + len(G.synthesis.block_resolutions) - 1
    assert A.shape == (sum(m.weight.shape[0] for m in affines), G.w_dim)
