"""LPIPS with its backbone read from a torchvision weights file in the models folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import alexnet

from stitchtime_core.errors import InputError
from stitchtime_core.losses import build_lpips


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A file laid out as torchvision's alexnet-owt-7be5be79.pth (a plain state dict), random weights."""
    torch.manual_seed(3)
    net = alexnet(weights=None)
    path = tmp_path_factory.mktemp("models") / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_backbone_weights_are_loaded_into_every_lpips_slice(alexnet_file) -> None:
    path, net = alexnet_file
    lpips_net = build_lpips(backbone_path=path)
    loaded = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]: p
              for name, p in lpips_net.net.named_parameters()}
    for index in (0, 3, 6, 8, 10):
        assert torch.equal(loaded[f"{index}.weight"], net.features[index].weight)
        assert torch.equal(loaded[f"{index}.bias"], net.features[index].bias)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    random_backbone = build_lpips()
    assert not torch.allclose(lpips_net(a, b), random_backbone(a, b))
    assert torch.equal(lpips_net(a, a), torch.zeros_like(lpips_net(a, a)))


def test_a_wrong_backbone_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(InputError, match="does not fit"):
        build_lpips(backbone_path=path)
    torch.save({"cp.resnet.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="no features"):
        build_lpips(backbone_path=path)
