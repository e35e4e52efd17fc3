"""ArcFace IR-SE50: the face-recognition backbone of pSp/e4e's identity loss.

Same module and parameter names as TreB1eN/InsightFace_Pytorch's ``Backbone(50, 0.6, 'ir_se')``
(``model.py``), which pSp and e4e copy as ``models/encoders/model_irse.py``: the keys of the
published ``model_ir_se50.pth``, a plain state dict (``IDLoss`` in pSp's ``criteria/id_loss.py``
passes ``torch.load(path)`` straight to ``load_state_dict``). The residual units are the e4e
encoder's, which are the same ``bottleneck_IR_SE``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from stitchtime_core.models.torch_files import load_state_dict_file
from stitchtime_core.models.e4e import ir_se50_stem_and_body

INPUT_SIZE = 112
"""The backbone's input resolution; its 7x7 final feature map is fixed by the linear layer."""

EMBEDDING_DIM = 512

WIDTHS = (64, 128, 256, 512)
"""Channels of the four IR-SE stages."""


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class ArcFace(nn.Module):
    """IR-SE50 backbone: 112 px face → 512-d unit embedding.

    ``forward`` ends with the reference's ``l2_norm``: callers compare embeddings by dot product.

    Args:
        drop_ratio: the dropout before the linear layer (inactive in eval mode); 0.6 as pSp builds it.

    Example:
        >>> net = ArcFace().eval()
        >>> net(torch.zeros(2, 3, 112, 112)).shape
        torch.Size([2, 512])
    """

    def __init__(self, *, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer, self.body = ir_se50_stem_and_body(WIDTHS)
        side = INPUT_SIZE // 2 ** len(WIDTHS)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(WIDTHS[-1]), nn.Dropout(drop_ratio), Flatten(),
                                          nn.Linear(WIDTHS[-1] * side * side, EMBEDDING_DIM),
                                          nn.BatchNorm1d(EMBEDDING_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [batch, 3, 112, 112] RGB in [-1, 1], the face centred as in :func:`arcface_input`.
        Returns: [batch, 512] unit vectors."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != INPUT_SIZE or x.shape[3] != INPUT_SIZE:
            raise ValueError(f"ArcFace input must be [batch, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def arcface_input(crops: torch.Tensor) -> torch.Tensor:
    """The backbone's input from FFHQ-aligned crops, as pSp/e4e's ``IDLoss.extract_feats`` makes it.

    The crop is brought to 256 px (area averaging, as pSp's ``AdaptiveAvgPool2d((256, 256))``
    does with its 1024 px outputs), cut to rows 35:223 and columns 32:220 (the inner face of an
    FFHQ crop) and average-pooled to 112 px.

    Args:
        crops: [N, 3, H, W] RGB in [-1, 1], FFHQ-aligned.

    Returns:
        [N, 3, 112, 112] in [-1, 1].
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [N, 3, H, W], got {list(crops.shape)}")
    x = crops.float()
    if x.shape[2:] != (256, 256):
        # Area resampling of a smaller crop is nearest upsampling; bilinear upsamples more smoothly.
        mode = "area" if min(x.shape[2:]) >= 256 else "bilinear"
        x = F.interpolate(x, (256, 256), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (INPUT_SIZE, INPUT_SIZE))


def load_arcface(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> ArcFace:
    """Build :class:`ArcFace` and load the published ``model_ir_se50.pth`` into it.

    Read with ``weights_only=True``: a file that would run code when unpickled is refused.

    Args:
        path: the state dict file.
        device: where the network goes.

    Returns:
        The network in eval mode, gradients off.

    Raises:
        InputError: the file is missing, cannot be read as tensors only, or is not an ArcFace
            IR-SE50 state dict (keys or shapes differ).
    """
    net = ArcFace()
    load_state_dict_file(path, net, what="an ArcFace IR-SE50 state dict")
    return net.to(device).eval().requires_grad_(False)
