"""BiSeNet face parsing (CelebAMask-HQ's 19 classes) and the face masks drawn from it (paper section 3.4).

Same module and parameter names as zllrunning/face-parsing.PyTorch's ``BiSeNet(n_classes=19)``
(``model.py``, with the ResNet-18 of its ``resnet.py``; STIT carries the same code as
``models/seg_model_2.py``), so the official ``79999_iter.pth`` loads as it is published. Unlike
the reference, building the network reads nothing: the reference's ``Resnet18.init_weight``
downloads torchvision's ImageNet weights, which the trained state dict overwrites anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.models.torch_files import load_state_dict_file

CLASS_NAMES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
               "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
"""The label of each class index: background, then CelebAMask-HQ's 18 attributes in the order the
reference's data preparation numbers them (1 = skin … 18 = hat)."""

BACKGROUND_CLASSES = (0, 16, 18)
"""What STIT's stitching mask leaves out (``calc_masks`` in ``edit_video_stitching_tuning.py``):
background, cloth and hat. Everything else, hair, neck, ears and earrings included, is face."""

INPUT_SIZE = 512
"""The resolution the network was trained at (CelebAMask-HQ masks are 512 px)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
"""(channels, stride) of ResNet-18's four stages; two basic blocks each."""


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU (``conv``, ``bn``)."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; ``downsample`` (1x1 conv + BN) only where the shape changes."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_chan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(shortcut + residual)


class Resnet18(nn.Module):
    """ResNet-18 without its classifier; returns the stride 8, 16 and 32 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chan = 64
        for index, (out_chan, stride) in enumerate(RESNET18_STAGES, start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(in_chan, out_chan, stride),
                                                         BasicBlock(out_chan, out_chan, 1)))
            in_chan = out_chan

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)
        self.sigmoid_atten = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = self.sigmoid_atten(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    """ResNet-18 with attention refinement of its stride 16 and 32 features and a global context."""

    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the ResNet's stride-8 feature, the refined context at stride 8 and at stride 16."""
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        feat32_sum = self.arm32(feat32) + context  # broadcasting is the reference's nearest 1x1 upsample
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = self.sigmoid(self.conv2(self.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The face-parsing network: ResNet-18 context path, feature fusion and a class head.

    ``conv_out16`` and ``conv_out32`` are the reference's auxiliary training heads. They are kept
    so the official state dict loads unchanged (and :meth:`forward_all` runs them), but
    :meth:`forward` only computes the main head, the one the reference's inference reads.

    Args:
        n_classes: number of classes (19 for the CelebAMask-HQ model).

    Example:
        >>> net = BiSeNet().eval()
        >>> net(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 19, 64, 64])
    """

    def __init__(self, n_classes: int = len(CLASS_NAMES)):
        super().__init__()
        self.n_classes = n_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [batch, 3, H, W], ImageNet-normalised RGB, H and W multiples of 32.
        Returns: class logits [batch, n_classes, H, W]."""
        return self.forward_all(x, auxiliary=False)[0]

    def forward_all(self, x: torch.Tensor, *, auxiliary: bool = True) -> tuple[torch.Tensor, ...]:
        """The reference's forward: the main logits, then (when ``auxiliary``) the stride-8 and
        stride-16 auxiliary logits, all bilinearly upsampled to [batch, n_classes, H, W]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BiSeNet input must be [batch, 3, H, W], got {list(x.shape)}")
        size = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        # The reference has no spatial path: the ResNet's stride-8 feature stands in for it.
        heads = [self.conv_out(self.ffm(feat_res8, feat_cp8))]
        if auxiliary:
            heads += [self.conv_out16(feat_cp8), self.conv_out32(feat_cp16)]
        return tuple(F.interpolate(h, size, mode="bilinear", align_corners=True) for h in heads)


def load_bisenet(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> BiSeNet:
    """Build :class:`BiSeNet` and load the official ``79999_iter.pth`` into it.

    The file is a plain state dict written by ``torch.save``; it is read with
    ``weights_only=True``, so a file that would run code when unpickled is refused, not run.

    Args:
        path: the state dict file.
        device: where the network goes.

    Returns:
        The network in eval mode, gradients off.

    Raises:
        InputError: the file is missing, cannot be read as tensors only, or is not a BiSeNet
            face-parsing state dict (keys or shapes differ).
    """
    net = BiSeNet()
    load_state_dict_file(path, net, what="a BiSeNet face-parsing state dict")
    return net.to(device).eval().requires_grad_(False)


def parse_faces(net: BiSeNet, crops: torch.Tensor, *, batch_size: int = 8, resize: str = "antialias",
                size: int | None = None) -> torch.Tensor:
    """Per-pixel class labels of face crops, computed as the reference computes them.

    Each crop is resized to 512 px, normalised with the ImageNet mean and std, and labelled by the
    argmax of the main head; the labels are resized to ``size`` with nearest-neighbour sampling.

    Args:
        net: a BiSeNet in eval mode, on the crops' device.
        crops: [N, 3, H, W] RGB in [-1, 1].
        batch_size: how many crops go through the network at once, > 0.
        resize: how the crops come to 512 px: "antialias" (bilinear, antialiased like a PIL resize) or
            "nearest" (STIT's ``calc_masks``).
        size: the labels' side (None: the crops' own size; 512: the network's, unresized).

    Returns:
        int64 [N, size, size] class indices into :data:`CLASS_NAMES`.

    Raises:
        ValueError: the crops are not [N, 3, H, W] or ``batch_size`` is not positive.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [N, 3, H, W], got {list(crops.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if resize not in ("antialias", "nearest"):
        raise ValueError(f"resize must be 'antialias' or 'nearest', got {resize!r}")
    height, width = crops.shape[2:] if size is None else (size, size)
    mean = torch.tensor(IMAGENET_MEAN, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=crops.device).view(1, 3, 1, 1)
    labels = []
    with torch.no_grad():
        for batch in crops.split(batch_size):
            images = batch.float().clamp(-1, 1).add(1).div(2)
            if images.shape[2:] != (INPUT_SIZE, INPUT_SIZE) and resize == "nearest":
                images = F.interpolate(images, (INPUT_SIZE, INPUT_SIZE), mode="nearest")
            elif images.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
                images = F.interpolate(images, (INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                       antialias=True)
            found = net((images - mean) / std).argmax(dim=1, keepdim=True)
            if (height, width) != (INPUT_SIZE, INPUT_SIZE):
                found = F.interpolate(found.float(), (height, width), mode="nearest").long()
            labels.append(found[:, 0])
    if not labels:
        return torch.zeros((0, height, width), dtype=torch.int64, device=crops.device)
    return torch.cat(labels)


def face_mask_from_labels(labels: torch.Tensor, *, background: Iterable[int] = BACKGROUND_CLASSES) -> torch.Tensor:
    """The face region of parsed crops: every pixel whose class is not a background class.

    Args:
        labels: int [N, H, W] class indices from :func:`parse_faces`.
        background: the classes outside the face; STIT's (background, cloth, hat) by default.

    Returns:
        float32 [N, H, W], 1 on the face, 0 elsewhere.

    Raises:
        ValueError: the labels are not an integer [N, H, W] tensor.
    """
    if labels.ndim != 3 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer [N, H, W] tensor, got {labels.dtype} {list(labels.shape)}")
    outside = torch.tensor(sorted(set(int(c) for c in background)), dtype=labels.dtype, device=labels.device)
    return (~torch.isin(labels, outside)).float()


