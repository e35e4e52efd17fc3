"""The e4e encoder: the official FFHQ architecture and names, progressive styles, and ``encode``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stitchtime_core.models.e4e import Encoder4Editing, encode

# A sample of the official e4e_ffhq_encode.pt encoder (keys after "encoder.") with their shapes.
OFFICIAL_STATE_SHAPES = {
    "input_layer.0.weight": [64, 3, 3, 3],
    "input_layer.1.weight": [64],
    "input_layer.2.weight": [64],
    "body.0.res_layer.1.weight": [64, 64, 3, 3],
    "body.3.shortcut_layer.0.weight": [128, 64, 1, 1],
    "body.7.shortcut_layer.0.weight": [256, 128, 1, 1],
    "body.21.shortcut_layer.0.weight": [512, 256, 1, 1],
    "body.23.res_layer.1.weight": [512, 512, 3, 3],
    "body.23.res_layer.4.weight": [512],
    "body.23.res_layer.5.fc1.weight": [32, 512, 1, 1],
    "body.23.res_layer.5.fc2.weight": [512, 32, 1, 1],
    "styles.0.convs.0.weight": [512, 512, 3, 3],
    "styles.0.convs.6.weight": [512, 512, 3, 3],
    "styles.0.linear.weight": [512, 512],
    "styles.3.convs.8.weight": [512, 512, 3, 3],
    "styles.17.convs.10.weight": [512, 512, 3, 3],
    "styles.17.linear.bias": [512],
    "latlayer1.weight": [512, 256, 1, 1],
    "latlayer2.weight": [512, 128, 1, 1],
}

# Recorded from build_tiny()'s encoder (torch 2.15 on an x86-64 CPU): encoder(x)[0, ::3, :4] for
# x = torch.rand([1, 3, 64, 64]) * 2 - 1 from torch.Generator().manual_seed(0).
TINY_CODES_SLICE = torch.tensor([[-0.004245, -0.015847, 0.034381, -0.024476],
                                 [0.004677, -0.047896, 0.004607, -0.057355],
                                 [-0.029045, -0.013461, 0.032602, -0.025286],
                                 [-0.015739, 0.015122, 0.046377, -0.034860]])


def test_official_config_has_the_official_names_and_shapes():
    with torch.device("meta"):
        E = Encoder4Editing(stylegan_size=1024, input_size=256)
    assert E.style_count == 18 and len(E.styles) == 18
    state = E.state_dict()
    assert {name: list(state[name].shape) for name in OFFICIAL_STATE_SHAPES if name in state} == OFFICIAL_STATE_SHAPES
    # IR-SE50: 3 + 4 + 14 + 3 bottleneck units; a stage's first unit whose width does not change
    # (body.0, 64 -> 64) has a max-pool shortcut without weights.
    assert any(k.startswith("body.23.") for k in state) and not any(k.startswith("body.24.") for k in state)
    assert "body.0.shortcut_layer.0.weight" not in state
    # Coarse styles start from 16x16 features (4 stride-2 convs), middle from 32x32, fine from 64x64.
    convs = [sum(1 for k in state if k.startswith(f"styles.{i}.convs.") and k.endswith(".weight")) for i in range(18)]
    assert convs == [4] * 3 + [5] * 4 + [6] * 11


def test_tiny_encoder_output_shape_and_stored_numbers(tiny):
    E = tiny.encoder
    assert E.style_count == tiny.generator.num_ws == 10
    x = torch.rand([1, 3, 64, 64], generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = E(x)
        batch = E(torch.cat([x, -x, x.flip(-1)]))
    assert codes.shape == (1, 10, 64) and batch.shape == (3, 10, 64)
    assert torch.allclose(codes[0, ::3, :4], TINY_CODES_SLICE, atol=1e-4)
    assert torch.allclose(batch[:1], codes, atol=1e-5)  # eval mode: batch elements are independent


def test_styles_are_progressive_offsets_of_the_first(tiny):
    """w_0 = styles[0](c3); w_i = w_0 + styles[i](features at the i-th level) for i >= 1."""
    E = tiny.encoder
    outputs: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}
    handles = [E.body[23].register_forward_hook(lambda m, a, out: taps.__setitem__("c3", out))]
    for i, block in enumerate(E.styles):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)))
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
    try:
        x = torch.rand([2, 3, 64, 64], generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            codes = E(x)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(outputs) == list(range(10))
    assert inputs[0] is taps["c3"]  # the first style reads the deepest features c3
    assert torch.equal(codes[:, 0], outputs[0])
    for i in range(1, 10):
        assert torch.allclose(codes[:, i], outputs[0] + outputs[i], atol=1e-6)
    # Coarse (0-2) from c3 at stride 16, middle (3-6) at stride 8, fine (7-9) at stride 4.
    assert [tuple(inputs[i].shape[2:]) for i in range(10)] == [(4, 4)] * 3 + [(8, 8)] * 4 + [(16, 16)] * 3
    assert (codes[:, 1:] - codes[:, :1]).abs().amax() > 1e-4  # the offsets are not zero


def test_encode_adds_the_average_latent(tiny, face_clip):
    x = face_clip.images[:2]
    with torch.no_grad():
        offsets = tiny.encoder(x)
        pivots = encode(tiny.encoder, x, tiny.latent_avg)
        pivots_from_vector = encode(tiny.encoder, x, tiny.latent_avg[0])
    assert pivots.shape == (2, 10, 64)
    assert torch.allclose(pivots, offsets + tiny.latent_avg, atol=1e-6)
    assert torch.allclose(pivots_from_vector, pivots, atol=1e-6)  # tiny's latent_avg repeats one w


def test_encode_resizes_other_input_sizes(tiny, face_clip):
    x = face_clip.images[:2]
    x128 = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        at_64 = encode(tiny.encoder, x, tiny.latent_avg)
        at_128 = encode(tiny.encoder, x128, tiny.latent_avg)
        mirrored = encode(tiny.encoder, x.flip(-1), tiny.latent_avg)
    assert at_128.shape == at_64.shape
    # The 128 px crop, brought back to 64 px, encodes close to the 64 px crop: far closer than a
    # different picture (its mirror image) does. Measured: 0.00058 vs 0.0044 mean difference.
    assert (at_128 - at_64).abs().mean() < 0.3 * (mirrored - at_64).abs().mean()


@pytest.mark.parametrize("shape", [[2, 1, 64, 64], [2, 3, 64, 32], [2, 3, 128, 128], [3, 64, 64]])
def test_wrong_input_shape_raises(tiny, shape):
    with pytest.raises(ValueError, match="e4e input must be"):
        tiny.encoder(torch.zeros(shape))
