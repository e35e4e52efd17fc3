"""Identity embeddings of aligned face crops, for the identity metrics (TL-ID, TG-ID).

Two networks fill the :class:`IdentityNet` role: dlib's face-recognition ResNet, which the
``face_recognition_models`` package ships and which is therefore always available (the default),
and ArcFace IR-SE50 (pSp/e4e's identity network) when its ``model_ir_se50.pth`` is supplied.
Both return unit vectors, so the similarity of two faces is the dot product of their embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import dlib
import numpy as np
import torch

from stitchtime_core.errors import InputError
from stitchtime_core.faces import _packaged_model
from stitchtime_core.models.arcface import EMBEDDING_DIM, ArcFace, arcface_input, load_arcface
from stitchtime_core.tensors import images_to_tensor

_RECOGNIZER_FILE = "models/dlib_face_recognition_resnet_model_v1.dat"
_PREDICTOR_5_FILE = "models/shape_predictor_5_face_landmarks.dat"

DLIB_DIM = 128
"""Length of dlib's face descriptor."""

DLIB_CHIP_SIZE = 150
"""dlib's recogniser reads 150 px face chips ..."""
DLIB_CHIP_PADDING = 0.25
"""... cut with 25 % padding around the landmarks' face box (its training setup, dlib's default)."""

FFHQ_FACE_BOX = (0.24, 0.36, 0.76, 0.88)
"""Where dlib's HOG detector puts the face box in an FFHQ-aligned crop, as fractions of the
crop's width and height (left, top, right, bottom). Measured on skimage's astronaut aligned at
64, 256 and 1024 px: boxes (0.20-0.26, 0.34-0.38, 0.77, 0.88-0.91). The landmark predictor
starts from this box instead of a detection: the crop is already aligned, so this never misses a
face (edited and generated crops included) and adds no detection jitter between frames."""


@runtime_checkable
class IdentityNet(Protocol):
    """A face-identity embedding.

    Attributes:
        name: which network and weights, for reports and cache keys.
    """

    name: str

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """Embed aligned face crops.

        Args:
            faces: uint8 [N, H, W, 3] RGB FFHQ-aligned crops (square).

        Returns:
            float32 [N, D] unit vectors; the cosine similarity of two faces is their dot product.
        """
        ...


@dataclass(frozen=True, eq=False)
class DlibIdentity:
    """dlib's face-recognition ResNet (128-d); build it with :func:`load_dlib_identity`.

    For each crop, dlib's 5-point landmark predictor is fitted starting from the fixed box
    :data:`FFHQ_FACE_BOX` (no face detection), ``dlib.get_face_chip`` cuts the 150 px chip the
    recogniser expects from those landmarks, and the descriptor is scaled to unit length.

    Attributes:
        recognizer: ``dlib.face_recognition_model_v1``.
        predictor: dlib's 5-point shape predictor (the one dlib's face-recognition example uses).
        name: identifies the network.
        face_box: where the predictor starts, as fractions of the crop (left, top, right, bottom).
    """

    recognizer: dlib.face_recognition_model_v1
    predictor: dlib.shape_predictor
    name: str = "dlib_face_recognition_resnet_model_v1"
    face_box: tuple[float, float, float, float] = FFHQ_FACE_BOX

    def chips(self, faces: np.ndarray) -> np.ndarray:
        """The 150 px face chips the recogniser reads.

        Args:
            faces: uint8 [N, H, W, 3] RGB aligned crops.

        Returns:
            uint8 [N, 150, 150, 3].
        """
        _check_faces(faces)
        chips = []
        for face in faces:
            image = np.ascontiguousarray(face)
            height, width = image.shape[:2]
            left, top, right, bottom = self.face_box
            box = dlib.rectangle(round(left * width), round(top * height),
                                 round(right * width) - 1, round(bottom * height) - 1)
            shape = self.predictor(image, box)
            chips.append(dlib.get_face_chip(image, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING))
        if not chips:
            return np.zeros((0, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3), np.uint8)
        return np.stack(chips)

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """Unit 128-d descriptors of aligned crops: float32 [N, 128] (see :class:`IdentityNet`)."""
        chips = self.chips(faces)
        if len(chips) == 0:
            return np.zeros((0, DLIB_DIM), np.float32)
        descriptors = self.recognizer.compute_face_descriptor(list(chips))
        vectors = np.array([np.asarray(d) for d in descriptors], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@dataclass(frozen=True, eq=False)
class ArcFaceIdentity:
    """ArcFace IR-SE50 (512-d); build it with :func:`load_arcface_identity`.

    Crops go in as pSp/e4e's identity loss feeds them (``IDLoss.extract_feats`` in
    eladrich/pixel2style2pixel ``criteria/id_loss.py``): at 256 px, rows 35:223 and columns
    32:220, average-pooled to 112 px (:func:`stitchtime_core.models.arcface.arcface_input`).

    Attributes:
        net: the backbone, in eval mode; embedding runs on its device.
        name: identifies the network.
        batch_size: crops per forward pass.
    """

    net: ArcFace
    name: str = "arcface_ir_se50"
    batch_size: int = 32

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """Unit 512-d embeddings of aligned crops: float32 [N, 512] (see :class:`IdentityNet`)."""
        _check_faces(faces)
        if len(faces) == 0:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        device = next(self.net.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(faces), self.batch_size):
                images = images_to_tensor(np.ascontiguousarray(faces[start:start + self.batch_size]), device)
                out.append(self.net(arcface_input(images)).float().cpu())
        return torch.cat(out).numpy()


def load_dlib_identity(*, recognizer_path: str | os.PathLike | None = None,
                       predictor_path: str | os.PathLike | None = None) -> DlibIdentity:
    """Load dlib's face-recognition ResNet and its 5-point landmark predictor.

    Args:
        recognizer_path: a ``dlib_face_recognition_resnet_model_v1.dat``; the one shipped by
            ``face_recognition_models`` when None.
        predictor_path: a ``shape_predictor_5_face_landmarks.dat``; likewise.

    Raises:
        InputError: a file is missing or is not the dlib model it should be.
    """
    recognizer_file = (Path(recognizer_path) if recognizer_path is not None
                       else _packaged_model(_RECOGNIZER_FILE, "face-recognition model"))
    predictor_file = (Path(predictor_path) if predictor_path is not None
                      else _packaged_model(_PREDICTOR_5_FILE, "5-point landmark model"))
    for path, what in ((recognizer_file, "face-recognition model"), (predictor_file, "5-point landmark model")):
        if not path.is_file():
            raise InputError(path, f"{what} file not found")
    try:
        recognizer = dlib.face_recognition_model_v1(str(recognizer_file))
    except RuntimeError as e:
        raise InputError(recognizer_file, f"not a dlib face-recognition model ({e})") from e
    try:
        predictor = dlib.shape_predictor(str(predictor_file))
    except RuntimeError as e:
        raise InputError(predictor_file, f"not a dlib shape predictor ({e})") from e
    parts = predictor(np.zeros((8, 8, 3), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
    if parts != 5:
        raise InputError(predictor_file, f"is a {parts}-point shape predictor; the identity chips are cut "
                                         "from the 5-point one")
    return DlibIdentity(recognizer, predictor)


def load_arcface_identity(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                          batch_size: int = 32) -> ArcFaceIdentity:
    """Load ``model_ir_se50.pth`` as an identity network (see :func:`load_arcface`).

    Raises:
        InputError: the file is missing, unreadable, or not an ArcFace IR-SE50 state dict.
        ValueError: ``batch_size`` is not positive.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return ArcFaceIdentity(load_arcface(path, device=device), batch_size=batch_size)


def _check_faces(faces: np.ndarray) -> None:
    if not isinstance(faces, np.ndarray) or faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
        described = f"{faces.dtype} {list(faces.shape)}" if isinstance(faces, np.ndarray) else type(faces).__name__
        raise ValueError(f"faces must be a uint8 [N, H, W, 3] array, got {described}")
