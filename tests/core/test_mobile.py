"""MobileStyleGAN written here, on the real weights: the same images as the OpenVINO runtime, and usable
for PTI and stitching (gradients, vmap), with StyleGAN2's W+ mapped onto its 23 styles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from stitchtime_core.editing import load_direction_file
from stitchtime_core.errors import InputError
from stitchtime_core.models.mobile import STYLEGAN2_LAYERS, MobileGenerator, load_mobile_generator

STORED = json.loads((Path(__file__).parent / "data" / "mobilestylegan_openvino.json").read_text())
"""The OpenVINO runtime's w and image pixels for three seeds (how they were made: the file's "source")."""


@pytest.fixture(scope="module")
def G(mobile_models: Path) -> MobileGenerator:
    folder = mobile_models / "mobilestylegan"
    return load_mobile_generator(folder / "MappingNetwork.xml", folder / "SynthesisNetwork.xml")


def _z(seed: int) -> torch.Tensor:
    return torch.randn(1, 512, generator=torch.Generator().manual_seed(seed))


def _image(G: MobileGenerator, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G.synthesis(w.reshape(1, 1, -1).expand(1, G.num_ws, -1))[0]


def test_generator_gives_the_runtimes_numbers(G: MobileGenerator) -> None:
    for seed, expected in STORED["seeds"].items():
        with torch.no_grad():
            w = G.mapping(_z(int(seed)))[0, 0]
        np.testing.assert_allclose(w[:6].numpy(), expected["w"], atol=1e-4)
        image = _image(G, w)
        pixels = image[:, STORED["rows"]][:, :, STORED["cols"]].permute(1, 2, 0).reshape(-1, 3)
        np.testing.assert_allclose(pixels.numpy(), expected["pixels"], atol=1e-3)
        assert abs(float(image.mean()) - expected["mean"]) < 1e-4
        assert abs(float(image.std()) - expected["std"]) < 1e-4


def test_generator_matches_the_openvino_runtime(G: MobileGenerator, mobile_models: Path) -> None:
    ov = pytest.importorskip("openvino", reason="the OpenVINO runtime (pip install openvino) checks the port")
    core, folder = ov.Core(), mobile_models / "mobilestylegan"
    precise = {"INFERENCE_PRECISION_HINT": "f32"}  # a CPU with bf16 would otherwise run in bf16
    mapping = core.compile_model(core.read_model(folder / "MappingNetwork.xml"), "CPU", precise)
    synthesis = core.compile_model(core.read_model(folder / "SynthesisNetwork.xml"), "CPU", precise)
    for seed in (3, 4, 5):
        z = _z(seed)
        w_runtime = mapping(z.numpy())[0]
        with torch.no_grad():
            w = G.mapping(z)[0, 0]
        assert np.abs(w.numpy() - w_runtime[0]).max() < 1e-4
        difference = np.abs(_image(G, w).numpy() - synthesis(w_runtime)[0][0]).max()
        assert difference <= 1e-3, f"seed {seed}: max abs difference {difference}"


def test_each_style_plays_its_part(G: MobileGenerator) -> None:
    with torch.no_grad():
        w = G.mapping(_z(0))[0, 0]
        other = G.mapping(_z(1))[0, 0]
    base = _image(G, w)

    def changed(style: int) -> float:
        ws = w.reshape(1, 1, -1).repeat(1, G.num_ws, 1)
        ws[0, style] = other
        with torch.no_grad():
            return float((G.synthesis(ws)[0] - base).abs().max())

    dead = [3, 6, 9, 12, 15, 18, 22]  # the wavelet heads of blocks 0-5 (absent from the export) and style 22
    for style in range(G.num_ws):
        assert (changed(style) == 0) == (style in dead), f"style {style}"


def test_gradients_reach_the_weights_and_vmap_gives_the_same_image(G: MobileGenerator) -> None:
    synthesis = G.synthesis
    with torch.no_grad():
        ws = G.mapping(_z(2))
    params = {name: p.detach().clone().requires_grad_(True) for name, p in synthesis.named_parameters()}
    buffers = dict(synthesis.named_buffers())
    image = functional_call(synthesis, (params, buffers), (ws,))
    image.square().mean().backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(params["to_img.weight"].grad.abs().sum()) > 0
    assert float(params["conv1.weight"].grad.abs().sum()) > 0

    # Stitching tunes one copy of the weights per frame under vmap: the same image as the plain call.
    stacked = {name: p.detach().unsqueeze(0) for name, p in params.items()}
    one_frame = lambda frame_params, frame_ws: functional_call(synthesis, (frame_params, buffers),  # noqa: E731
                                                               (frame_ws[None],))[0]
    # To float rounding: vmap's batched convolutions add in another order (up to 2e-5 on an AVX-512 CPU).
    with torch.no_grad():
        torch.testing.assert_close(vmap(one_frame)(stacked, ws), image.detach(), atol=1e-4, rtol=0)


def test_stylegan2_wplus_directions_map_each_style_to_the_entry_of_the_same_part(tmp_path: Path) -> None:
    assert len(STYLEGAN2_LAYERS) == 23
    assert STYLEGAN2_LAYERS[:4] == (0, 1, 2, 3)  # 4 px conv; the 8 px block's upsampling, conv and head
    assert STYLEGAN2_LAYERS[19:] == (13, 14, 17, 17)  # the 512 px block, then the final image head
    per_layer = tmp_path / "per_layer.npy"
    np.save(per_layer, np.arange(18.0, dtype=np.float32)[:, None].repeat(4, axis=1))
    mapped = load_direction_file(per_layer, num_ws=23, w_dim=4, stylegan2_layers=STYLEGAN2_LAYERS)
    assert mapped.shape == (23, 4)
    assert mapped[:, 0].tolist() == [float(i) for i in STYLEGAN2_LAYERS]
    equal_rows = tmp_path / "equal_rows.npy"  # STIT's layout: its first row, halved, on every style
    row = np.random.default_rng(0).standard_normal(4).astype(np.float32)
    np.save(equal_rows, np.tile(row, (18, 1)))
    torch.testing.assert_close(load_direction_file(equal_rows, num_ws=23, w_dim=4, stylegan2_layers=STYLEGAN2_LAYERS),
                               torch.from_numpy(row / 2).expand(23, 4))
    with pytest.raises(InputError, match=r"\[18, 4\]"):  # the mobile generator's own 23 rows are fine, 17 are not
        np.save(per_layer, np.zeros((17, 4), np.float32))
        load_direction_file(per_layer, num_ws=23, w_dim=4, stylegan2_layers=STYLEGAN2_LAYERS)
