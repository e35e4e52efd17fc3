"""e4e_ffhq_encode.pt: a synthetic checkpoint with the official layout loads into our encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fake_official import seeded_weights
from stitchtime_core.errors import InputError
from stitchtime_core.models.e4e import Encoder4Editing, encode
from stitchtime_core.models.e4e_checkpoint import load_e4e_checkpoint

# Same structure as the official file (IR-SE50, 18 styles for a 1024 px generator), smaller widths.
WIDTHS = (16, 32, 64, 64)


def official_layout_checkpoint(path: Path, *, input_size: int = 64, latent_avg_shape=(18, 64)) -> Encoder4Editing:
    # Seeded weights with non-trivial batch-norm statistics, so a missed buffer would show.
    encoder = seeded_weights(Encoder4Editing(stylegan_size=1024, input_size=input_size, widths=WIDTHS), seed=0)
    gen = torch.Generator().manual_seed(1)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["decoder.style.1.weight"] = torch.randn(64, 64, generator=gen)  # the pSp decoder sits beside the encoder
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True,
            "checkpoint_path": None, "lpips_lambda": 0.8, "dataset_type": "ffhq_encode"}
    torch.save({"state_dict": state, "opts": opts, "latent_avg": torch.randn(*latent_avg_shape, generator=gen)}, path)
    return encoder


def test_official_layout_loads_with_identical_weights_and_output(tmp_path: Path) -> None:
    path = tmp_path / "e4e_ffhq_encode.pt"
    original = official_layout_checkpoint(path)
    checkpoint = load_e4e_checkpoint(path)
    assert checkpoint.encoder.style_count == 18 and checkpoint.encoder.input_size == 64
    assert checkpoint.latent_avg.shape == (18, 64)
    assert checkpoint.opts["stylegan_size"] == 1024
    for key, value in original.state_dict().items():
        assert torch.equal(checkpoint.encoder.state_dict()[key], value), key
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(checkpoint.encoder(x), original(x))


# What the loaded synthetic checkpoint computes for the seed-2 crops, recorded once: a change to the
# loader or to the encoder that still loads the file but computes something else shows here.
STORED_OFFSETS_SUM = torch.tensor(36.15002060)
"""The sum of the encoder's [2, 18, 64] offsets from latent_avg."""
STORED_PIVOTS = torch.tensor([[-1.83823085, 0.52508497, 0.73020989],
                              [-1.95244670, 0.39612809, 0.61175805]])
"""``encode(...)[:, [0, 9, 17], 0]``: a coarse, a middle and a fine style of both pivots."""
STORED_PIVOTS_SUM = torch.tensor(15.26186752)


def test_loaded_checkpoint_gives_the_stored_numbers(tmp_path: Path) -> None:
    path = tmp_path / "e4e_ffhq_encode.pt"
    official_layout_checkpoint(path)
    checkpoint = load_e4e_checkpoint(path)
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        offsets = checkpoint.encoder(crops)
        pivots = encode(checkpoint.encoder, crops, checkpoint.latent_avg)
    assert pivots.shape == (2, 18, 64)
    torch.testing.assert_close(offsets.sum(), STORED_OFFSETS_SUM, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pivots[:, [0, 9, 17], 0], STORED_PIVOTS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pivots.sum(), STORED_PIVOTS_SUM, atol=1e-4, rtol=1e-4)


def test_input_size_is_read_off_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "e4e.pt"
    official_layout_checkpoint(path, input_size=128)
    assert load_e4e_checkpoint(path).encoder.input_size == 128


def test_a_one_row_latent_avg_is_repeated(tmp_path: Path) -> None:
    path = tmp_path / "e4e.pt"
    official_layout_checkpoint(path, latent_avg_shape=(64,))
    latent_avg = load_e4e_checkpoint(path).latent_avg
    assert latent_avg.shape == (18, 64) and torch.equal(latent_avg[0], latent_avg[17])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["opts", "decoder weights"])
def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path, where: str) -> None:
    path, marker = tmp_path / "e4e.pt", tmp_path / "ran"
    if where == "opts":
        torch.save({"state_dict": {}, "opts": {"evil": _Payload(marker)}}, path)
    else:  # where the pSp decoder's rosinality weights sit
        torch.save({"state_dict": {"decoder.style.1.weight": _Payload(marker)}, "opts": {}}, path)
    with pytest.raises(InputError, match="cannot be read as a tensors-only torch file .*system") as error:
        load_e4e_checkpoint(path)
    assert error.value.path == str(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: the unsafe reader runs the payload
    assert marker.exists()


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    (b"not a torch file", "is not a torch file, so it is not an e4e checkpoint"),
    ({"weights": torch.zeros(1)}, "expected a dict with 'state_dict'"),
    ({"state_dict": {"cp.resnet.conv1.weight": torch.zeros(1)}}, "no encoder.input_layer"),
])
def test_wrong_files_get_one_clear_error(tmp_path: Path, content, problem: str) -> None:
    path = tmp_path / "e4e.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InputError, match=problem):
        load_e4e_checkpoint(path)


def test_weights_of_the_wrong_shape_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "e4e.pt"
    official_layout_checkpoint(path)
    data = torch.load(path, weights_only=True)
    data["state_dict"]["encoder.latlayer1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(data, path)
    with pytest.raises(InputError, match="do not fit the architecture"):
        load_e4e_checkpoint(path)
