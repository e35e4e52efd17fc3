"""BiSeNet face parsing: the reference's architecture and names, loading its state dict, and the masks.

The official ``79999_iter.pth`` is not available offline: the loader is proven on files with the
identical structure, a full-size network of ours saved with ``torch.save(state_dict)`` as
face-parsing.PyTorch's training script saves it, in the zip format and in the legacy format that
PyTorch wrote before 1.6 (the published file dates from 2019).
"""

from __future__ import annotations

import os

import pytest
import torch

from fake_official import RunsCommandWhenUnpickled, seeded_weights
from stitchtime_core.errors import InputError
from stitchtime_core.models.arcface import ArcFace
from stitchtime_core.models.bisenet import (BACKGROUND_CLASSES, CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD,
                                            BiSeNet, face_mask_from_labels, load_bisenet, parse_faces)
from stitchtime_core.models.e4e import Encoder4Editing


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bisenet() -> BiSeNet:
    # Seeded weights and non-trivial BatchNorm statistics, so a loader that skipped buffers would be caught.
    net = seeded_weights(BiSeNet(), seed=0)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked.fill_(80000)
    return net


def _resnet18_without_fc() -> int:
    conv = lambda i, o, k: i * o * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 64, 7) + bn(64)
    in_c = 64
    for out_c in (64, 128, 256, 512):
        for block in range(2):
            c_in = in_c if block == 0 else out_c
            total += conv(c_in, out_c, 3) + bn(out_c) + conv(out_c, out_c, 3) + bn(out_c)
            if block == 0 and c_in != out_c:
                total += conv(c_in, out_c, 1) + bn(out_c)
        in_c = out_c
    return total


def test_parameter_count_matches_the_reference_architecture():
    conv = lambda i, o, k: i * o * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    resnet = _resnet18_without_fc()
    assert resnet == 11_689_512 - (512 * 1000 + 1000)  # torchvision's resnet18 less its classifier
    arm = lambda i: conv(i, 128, 3) + bn(128) + conv(128, 128, 1) + bn(128)  # noqa: E731
    context = arm(256) + arm(512) + 2 * (conv(128, 128, 3) + bn(128)) + conv(512, 128, 1) + bn(128)
    ffm = conv(256, 256, 1) + bn(256) + conv(256, 64, 1) + conv(64, 256, 1)
    head = lambda i, m: conv(i, m, 3) + bn(m) + conv(m, 19, 1)  # noqa: E731
    expected = resnet + context + ffm + head(256, 256) + 2 * head(128, 64)
    assert expected == 13_300_416
    with torch.device("meta"):
        net = BiSeNet()
    assert sum(p.numel() for p in net.parameters()) == expected


def test_state_dict_names_and_shapes_are_the_references():
    with torch.device("meta"):
        state = BiSeNet().state_dict()
    assert len(state) == 191  # 153 weights and biases + 38 BatchNorm counters
    for key, shape in {
        "cp.resnet.conv1.weight": [64, 3, 7, 7],
        "cp.resnet.layer1.1.bn2.running_var": [64],
        "cp.resnet.layer2.0.downsample.0.weight": [128, 64, 1, 1],
        "cp.resnet.layer4.1.conv2.weight": [512, 512, 3, 3],
        "cp.arm16.conv.conv.weight": [128, 256, 3, 3],
        "cp.arm32.conv_atten.weight": [128, 128, 1, 1],
        "cp.arm32.bn_atten.bias": [128],
        "cp.conv_head32.conv.weight": [128, 128, 3, 3],
        "cp.conv_avg.conv.weight": [128, 512, 1, 1],
        "ffm.convblk.conv.weight": [256, 256, 1, 1],
        "ffm.conv1.weight": [64, 256, 1, 1],
        "ffm.conv2.weight": [256, 64, 1, 1],
        "conv_out.conv.conv.weight": [256, 256, 3, 3],
        "conv_out.conv_out.weight": [19, 256, 1, 1],
        "conv_out16.conv_out.weight": [19, 64, 1, 1],
        "conv_out32.conv.bn.weight": [64],
    }.items():
        assert list(state[key].shape) == shape, key
    assert not [k for k in state if k.startswith(("sp.", "cp.resnet.fc"))]  # no spatial path, no classifier
    assert not [k for k in state if "layer1.0.downsample" in k]  # 64 → 64 at stride 1 needs none


def test_construction_reads_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("BiSeNet() tried to read or download weights")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    BiSeNet()


def test_forward_shapes(bisenet):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        main = bisenet(x)
        heads = bisenet.forward_all(x)
    assert main.shape == (2, 19, 64, 96)
    assert [h.shape for h in heads] == [(2, 19, 64, 96)] * 3
    torch.testing.assert_close(heads[0], main)
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        bisenet(torch.zeros(1, 1, 64, 64))


# The loaded network's logits for the seed-1 crops, recorded once: a change to the loader or to the
# architecture that still loads the file but computes something else shows here.
STORED_LOGITS = torch.tensor([[0.29660183, 0.09848931, -0.36811233, 0.53691334],
                              [0.01080431, -0.11255710, -0.21876037, 0.62228709]])
"""``net(crops)[:, [0, 1, 10, 17], 64, 64]``: background, skin, nose and hair at the centre pixel."""
STORED_LOGITS_SUM = torch.tensor(50289.6172)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_official_layout_round_trip(bisenet, tmp_path, zip_format):
    path = tmp_path / "79999_iter.pth"
    torch.save(bisenet.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    loaded = load_bisenet(path)
    path.unlink()
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = bisenet.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    crops = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(parse_faces(loaded, crops), parse_faces(bisenet, crops))
    with torch.no_grad():
        logits = loaded(crops)
    torch.testing.assert_close(logits[:, [0, 1, 10, 17], 64, 64], STORED_LOGITS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits.sum(), STORED_LOGITS_SUM, atol=1e-4, rtol=1e-4)


def test_file_without_batchnorm_counters_loads(bisenet, tmp_path):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in bisenet.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_bisenet(path)
    path.unlink()
    assert torch.equal(loaded.cp.resnet.bn1.running_var, bisenet.cp.resnet.bn1.running_var)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as info:
        load_bisenet(tmp_path / "79999_iter.pth")
    assert info.value.path == str(tmp_path / "79999_iter.pth")


def test_arcface_file_is_refused(tmp_path):
    path = tmp_path / "model_ir_se50.pth"
    torch.save(ArcFace().state_dict(), path)
    with pytest.raises(InputError) as info:
        load_bisenet(path)
    path.unlink()
    assert info.value.path == str(path)
    assert "is not a BiSeNet face-parsing state dict (missing cp.resnet.conv1.weight" in info.value.problem
    assert "unexpected input_layer.0.weight" in info.value.problem


def test_e4e_checkpoint_is_refused(tmp_path):
    path = tmp_path / "e4e_ffhq_encode.pt"
    encoder = Encoder4Editing(stylegan_size=64, input_size=64, widths=(8, 8, 16, 16))
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "latent_avg": torch.zeros(10, 16), "opts": {"encoder_type": "Encoder4Editing"}}, path)
    with pytest.raises(InputError, match=r"not a BiSeNet face-parsing state dict \(missing .*unexpected "
                                         r"state_dict, latent_avg, opts"):
        load_bisenet(path)


def test_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "18_classes.pth"
    torch.save(BiSeNet(n_classes=18).state_dict(), path)
    with pytest.raises(InputError, match=r"conv_out.conv_out.weight has shape \[18, 256, 1, 1\], "
                                         r"the network needs \[19, 256, 1, 1\]"):
        load_bisenet(path)


@pytest.mark.parametrize("content", ["tensor", "list", "garbage", "empty"])
def test_not_a_state_dict(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content in ("garbage", "empty"):
        path.write_bytes(b"this is not a torch file" if content == "garbage" else b"")
    else:
        torch.save(torch.zeros(3) if content == "tensor" else [torch.zeros(3)], path)
    with pytest.raises(InputError, match="BiSeNet face-parsing state dict") as info:
        load_bisenet(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("payload, global_name", [(CreatesMarker, "io.open"),
                                                  (RunsCommandWhenUnpickled, f"{os.system.__module__}.system")])
def test_malicious_pickle_is_refused_unrun(tmp_path, payload, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "79999_iter.pth"
    torch.save({"cp.resnet.conv1.weight": payload(marker)}, path)
    with pytest.raises(InputError, match="tensors-only") as info:
        load_bisenet(path)
    assert info.value.path == str(path)
    assert f"GLOBAL {global_name}" in info.value.problem
    assert not marker.exists()
    # The file really is malicious: the unsafe reader runs its payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


class RecordsInput(torch.nn.Module):
    """Stands in for BiSeNet: remembers its input; class 1 wins where red > green, else class 0."""

    def forward(self, x):
        self.seen = x
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[:, 1] = (x[:, 0] > x[:, 1]).float()
        logits[:, 0] = 0.5
        return logits


def test_parse_faces_preprocesses_like_the_reference():
    crops = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(2)) * 2 - 1
    net = RecordsInput()
    labels = parse_faces(net, crops, batch_size=1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(net.seen, ((crops[1:] + 1) / 2 - mean) / std)  # the last batch
    assert labels.dtype == torch.int64 and labels.shape == (2, 512, 512)
    red_wins = ((crops[:, 0] + 1) / 2 - IMAGENET_MEAN[0]) / IMAGENET_STD[0] > \
               ((crops[:, 1] + 1) / 2 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert torch.equal(labels, red_wins.long())


def test_parse_faces_resizes_to_512_and_back():
    # A red left half and a green right half: the labels must follow the halves at the crop's size.
    crops = -torch.ones(1, 3, 64, 64)
    crops[:, 0, :, :32] = 1
    crops[:, 1, :, 32:] = 1
    net = RecordsInput()
    labels = parse_faces(net, crops)
    assert net.seen.shape == (1, 3, 512, 512)
    assert labels.shape == (1, 64, 64)
    assert (labels[0, :, :32] == 1).all() and (labels[0, :, 32:] == 0).all()


def test_parse_faces_with_the_network(bisenet):
    labels = parse_faces(bisenet, torch.zeros(3, 3, 96, 96), batch_size=2)
    assert labels.shape == (3, 96, 96) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < 19
    assert parse_faces(bisenet, torch.zeros(0, 3, 96, 96)).shape == (0, 96, 96)
    with pytest.raises(ValueError, match="batch_size"):
        parse_faces(bisenet, torch.zeros(1, 3, 96, 96), batch_size=0)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        parse_faces(bisenet, torch.zeros(3, 96, 96))


def test_face_mask_leaves_out_background_cloth_and_hat():
    assert [CLASS_NAMES[c] for c in BACKGROUND_CLASSES] == ["background", "cloth", "hat"]
    assert CLASS_NAMES[17] == "hair" and CLASS_NAMES[14] == "neck"
    labels = torch.arange(19).view(1, 1, 19).repeat(2, 3, 1)
    mask = face_mask_from_labels(labels)
    assert mask.dtype == torch.float32 and mask.shape == (2, 3, 19)
    assert torch.equal(mask[0, 0], torch.tensor([0.0 if c in (0, 16, 18) else 1.0 for c in range(19)]))
    assert face_mask_from_labels(labels, background=(0,)).sum() == 2 * 3 * 18
    with pytest.raises(ValueError, match="integer"):
        face_mask_from_labels(labels.float())
