"""Shared fixtures of the ML core tests: the tiny profile, real face crops, their pivots and one PTI run.

Everything is session-scoped and built once: the tests must treat these objects as read only
(copy a network before changing it).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from stitchtime_core import alignment
from stitchtime_core.config import AlignmentConfig, PTIConfig
from stitchtime_core.faces import FaceLandmarker, load_landmarker
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.e4e import encode
from stitchtime_core.models.profiles import Models, build_tiny
from stitchtime_core.pti import PTIResult, tune_generator
from stitchtime_core.tensors import images_to_tensor

CROP_SIZE = 64
"""The tiny profile's resolution."""

FRAME_MOVES = ((0, 0, 0.0), (3, -2, 2.0), (-4, 3, -3.0), (6, 1, 5.0), (-2, -5, -6.0), (1, 4, 8.0))
"""(dx, dy, degrees) of each frame of the test clip: the astronaut photo shifted and turned a little."""



@dataclass(frozen=True)
class FaceClip:
    """A short "video" of one real face, aligned as the pipeline aligns it."""

    crops: np.ndarray
    """uint8 [frames, 64, 64, 3] aligned crops."""
    crop_landmarks: np.ndarray
    """float64 [frames, 68, 2] landmarks in crop pixels."""
    images: torch.Tensor
    """float32 [frames, 3, 64, 64] the crops in [-1, 1]."""

    @property
    def crops_chw(self) -> torch.Tensor:
        """uint8 [frames, 3, 64, 64] the crops as PTI takes them from the store."""
        return torch.from_numpy(self.crops).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class PTIRun:
    config: PTIConfig
    """Small PTI settings for the tiny profile: 6 frames x 8 observations / 2 per batch = 24 steps."""
    result: PTIResult
    original_state: dict[str, torch.Tensor]
    """The original generator's state dict, cloned before tuning."""
    progress: list[tuple[int, int, float]]
    """Every (step, total, loss) the progress callback received."""


def moved_frame(image: np.ndarray, dx: float, dy: float, degrees: float) -> np.ndarray:
    """``image`` turned by ``degrees`` about its face and shifted by (dx, dy) pixels."""
    matrix = cv2.getRotationMatrix2D((220.0, 120.0), degrees, 1.0)
    matrix[:, 2] += (dx, dy)
    height, width = image.shape[:2]
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


@pytest.fixture(scope="session")
def tiny() -> Models:
    return build_tiny()


@pytest.fixture(scope="session")
def lpips_fn() -> torch.nn.Module:
    return build_lpips()


@pytest.fixture(scope="session")
def landmarker() -> FaceLandmarker:
    """dlib's HOG detector (upsample 1) and the 68-point predictor."""
    return load_landmarker()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """uint8 [512, 512, 3] skimage's astronaut photo: one real face (box centre ~(220, 121)) and, at
    upsample 1, one false face (~(170, 380))."""
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def astronaut_landmarks(landmarker: FaceLandmarker, astronaut: np.ndarray) -> np.ndarray:
    """float64 [68, 2] landmarks of the astronaut's real face."""
    return landmarker.detect(astronaut)[0][1]


@pytest.fixture(scope="session")
def face_clip(landmarker: FaceLandmarker, astronaut: np.ndarray) -> FaceClip:
    frames = [moved_frame(astronaut, *move) for move in FRAME_MOVES]
    landmarks = []
    for i, frame in enumerate(frames):
        faces = landmarker.detect(frame)
        if not faces:
            raise RuntimeError(f"no face found in test frame {i} (move {FRAME_MOVES[i]})")
        landmarks.append(faces[0][1])
    landmarks = np.stack(landmarks)
    align = AlignmentConfig()
    quads = alignment.smooth_quads(landmarks, center_sigma=align.center_sigma, axes_sigma=align.axes_sigma,
                                   scale=align.scale)
    crops = np.stack([alignment.crop(frame, quad, CROP_SIZE) for frame, quad in zip(frames, quads)])
    crop_landmarks = np.stack([alignment.landmarks_to_crop(lm, quad, CROP_SIZE) for lm, quad in zip(landmarks, quads)])
    return FaceClip(crops, crop_landmarks, images_to_tensor(crops))


@pytest.fixture(scope="session")
def pivots(tiny: Models, face_clip: FaceClip) -> torch.Tensor:
    """[frames, 10, 64] e4e pivots of the clip's crops."""
    with torch.no_grad():
        return encode(tiny.encoder, face_clip.images, tiny.latent_avg)


@pytest.fixture(scope="session")
def pti_run(tiny: Models, face_clip: FaceClip, pivots: torch.Tensor, lpips_fn: torch.nn.Module) -> PTIRun:
    """One PTI run of the tiny generator around all pivots of the clip (λ_R as the paper)."""
    config = PTIConfig(lr=1e-2, observations_per_frame=8, batch_size=2)
    original_state = {k: v.clone() for k, v in tiny.generator.state_dict().items()}
    progress: list[tuple[int, int, float]] = []
    result = tune_generator(tiny.generator, pivots, face_clip.images, config=config, lpips_fn=lpips_fn,
                            progress=lambda step, total, loss: progress.append((step, total, loss)))
    return PTIRun(config, result, original_state, progress)
