"""Identity embeddings: dlib's face-recognition ResNet on real faces, ArcFace IR-SE50's architecture and loader.

dlib's model ships with ``face_recognition_models``, so its test uses the real network on real
photos: skimage's astronaut (one person, aligned several ways), faces from skimage's LFW subset
(other people) and skimage's cat. The official ``model_ir_se50.pth`` is not available offline:
the ArcFace loader is proven on full-size files of the identical structure (a plain state dict,
as pSp's ``IDLoss`` reads it), written in the zip format and in the legacy format of the 2018
original.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from fake_official import RunsCommandWhenUnpickled, seeded_weights
from stitchtime_core import alignment
from stitchtime_core.errors import InputError
from stitchtime_core.faces import FaceLandmarker, landmark_model_path
from stitchtime_core.identity import (DLIB_CHIP_SIZE, ArcFaceIdentity, DlibIdentity, IdentityNet,
                                      load_arcface_identity, load_dlib_identity)
from stitchtime_core.models.arcface import ArcFace, arcface_input, load_arcface
from stitchtime_core.models.bisenet import BiSeNet
from stitchtime_core.models.e4e import Encoder4Editing

SIZE = 256


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def aligned(image: np.ndarray, landmarks: np.ndarray, *, shift=(0.0, 0.0), scale: float = 1.0,
            size: int = SIZE) -> np.ndarray:
    """The FFHQ crop of a face, its square moved by ``shift`` frame pixels and resized by ``scale``."""
    c, x, y = alignment.face_axes(landmarks)
    return alignment.crop(image, alignment.quad_from_axes(c + np.asarray(shift), x * scale, y * scale), size)


def grey_low_res(crop: np.ndarray, side: int) -> np.ndarray:
    """A crop shrunk to ``side`` px, made grey and blown up again: the LFW faces' degradation."""
    small = cv2.cvtColor(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    return np.repeat(cv2.resize(small, crop.shape[:2][::-1], interpolation=cv2.INTER_CUBIC)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def dlib_identity() -> DlibIdentity:
    return load_dlib_identity()


@pytest.fixture(scope="module")
def astronaut_crop(astronaut, astronaut_landmarks) -> np.ndarray:
    return aligned(astronaut, astronaut_landmarks)


@pytest.fixture(scope="module")
def other_people(landmarker: FaceLandmarker) -> np.ndarray:
    """uint8 [8, 256, 256, 3] FFHQ crops of the first LFW-subset faces that dlib finds.

    The LFW subset holds 25 px grey face close-ups; each is enlarged 8x, padded by mirroring so
    the detector sees a whole head, and aligned like any frame.
    """
    crops = []
    for face in skimage.data.lfw_subset()[:100]:  # the subset's first 100 images are faces
        grey = cv2.resize(np.rint(face * 255).astype(np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
        image = np.repeat(cv2.copyMakeBorder(grey, 100, 100, 100, 100, cv2.BORDER_REFLECT_101)[..., None], 3, axis=2)
        found = landmarker.detect(image)
        if found:
            crops.append(aligned(image, found[0][1]))
        if len(crops) == 8:
            return np.stack(crops)
    raise RuntimeError("dlib found fewer than 8 faces in the LFW subset")


def test_dlib_identity_is_an_identity_net(dlib_identity):
    assert isinstance(dlib_identity, IdentityNet)
    assert dlib_identity.name == "dlib_face_recognition_resnet_model_v1"


def test_dlib_embeddings_are_unit_vectors(dlib_identity, astronaut_crop):
    faces = np.stack([astronaut_crop, astronaut_crop[::-1].copy()])
    chips = dlib_identity.chips(faces)
    assert chips.shape == (2, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE, 3) and chips.dtype == np.uint8
    vectors = dlib_identity.embed(faces)
    assert vectors.shape == (2, 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(dlib_identity.embed(faces[:1]), vectors[:1])  # no jitter: deterministic
    assert dlib_identity.embed(faces[:0]).shape == (0, 128)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        dlib_identity.embed(faces.astype(np.float32))


def test_fixed_face_box_matches_a_detection(dlib_identity, astronaut_crop):
    """The predictor started from FFHQ_FACE_BOX gives the chip a detection would (cosine 0.9997)."""
    import dlib

    box = dlib.get_frontal_face_detector()(astronaut_crop, 1)[0]
    chip = dlib.get_face_chip(astronaut_crop, dlib_identity.predictor(astronaut_crop, box), size=150, padding=0.25)
    detected = np.asarray(dlib_identity.recognizer.compute_face_descriptor(chip))
    fixed = dlib_identity.embed(astronaut_crop[None])[0]
    assert float(fixed @ detected) / np.linalg.norm(detected) > 0.999


def test_dlib_tells_the_same_person_from_others(dlib_identity, astronaut, astronaut_landmarks, astronaut_crop,
                                                other_people):
    """Cosine similarity to the astronaut's aligned crop.

    Measured (dlib 20.0.1, face_recognition_models 0.3.0):
      same face, crop moved (6, -4) px: 0.9992; scaled 1.08: 0.9994; scaled 0.93 and moved: 0.9995;
      cut at 128 px and enlarged: 0.9992 (a mirror image, for comparison: 0.9906, no different person);
      grey and shrunk to a 48 px crop like the LFW faces: 0.9672;
      the eight LFW faces (other people): 0.787 to 0.857, mean 0.831; the cat: 0.8836.
    dlib's descriptors share a large common component, so every face-like image scores above
    ~0.75: the distance 1 - cosine is what separates, 0.0005-0.0008 for the same face against
    0.12-0.21 for others (~140 times more). The grey 48 px astronaut (0.033) stays well on the
    same side, so the LFW faces are told apart by identity, not by their low resolution.
    """
    reference = dlib_identity.embed(astronaut_crop[None])[0]
    same = np.stack([
        aligned(astronaut, astronaut_landmarks, shift=(6, -4)),
        aligned(astronaut, astronaut_landmarks, scale=1.08),
        aligned(astronaut, astronaut_landmarks, shift=(-5, 3), scale=0.93),
        cv2.resize(aligned(astronaut, astronaut_landmarks, size=128), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC),
    ])
    same_sim = dlib_identity.embed(same) @ reference
    degraded_sim = float(dlib_identity.embed(grey_low_res(astronaut_crop, 48)[None])[0] @ reference)
    others_sim = dlib_identity.embed(other_people) @ reference
    cat = cv2.resize(skimage.data.chelsea()[0:300, 80:380], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    cat_sim = float(dlib_identity.embed(cat[None])[0] @ reference)

    assert same_sim.min() > 0.99
    assert degraded_sim > 0.95
    assert others_sim.max() < 0.90 and others_sim.mean() < 0.87
    assert cat_sim < 0.92
    # The same face is at least 20 times closer than anyone else.
    assert (1 - max(others_sim.max(), cat_sim)) > 20 * (1 - same_sim.min())


def test_dlib_loader_errors(tmp_path):
    with pytest.raises(InputError, match="face-recognition model file not found"):
        load_dlib_identity(recognizer_path=tmp_path / "missing.dat")
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"not a dlib model")
    with pytest.raises(InputError, match="not a dlib face-recognition model") as info:
        load_dlib_identity(recognizer_path=garbage)
    assert info.value.path == str(garbage)
    with pytest.raises(InputError, match="is a 68-point shape predictor"):
        load_dlib_identity(predictor_path=landmark_model_path())


# ArcFace IR-SE50 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcface() -> ArcFace:
    # Seeded weights and non-trivial BatchNorm statistics, so a loader that skipped buffers would be caught.
    return seeded_weights(ArcFace(), seed=0)


def test_arcface_parameter_count_matches_the_reference_architecture():
    def unit(in_c: int, depth: int) -> int:
        shortcut = 0 if in_c == depth else in_c * depth + 2 * depth
        se = 2 * depth * (depth // 16)
        return shortcut + 2 * in_c + in_c * depth * 9 + depth + depth * depth * 9 + 2 * depth + se

    total = 3 * 64 * 9 + 2 * 64 + 64  # input_layer: conv, BN, PReLU
    in_c = 64
    for depth, count in zip((64, 128, 256, 512), (3, 4, 14, 3)):
        total += unit(in_c, depth) + (count - 1) * unit(depth, depth)
        in_c = depth
    total += 2 * 512 + (512 * 7 * 7 * 512 + 512) + 2 * 512  # output_layer: BN2d, Linear, BN1d
    assert total == 43_797_696
    with torch.device("meta"):
        net = ArcFace()
    assert sum(p.numel() for p in net.parameters()) == total


def test_arcface_state_dict_names_and_shapes_are_the_references():
    with torch.device("meta"):
        state = ArcFace().state_dict()
    for key, shape in {
        "input_layer.0.weight": [64, 3, 3, 3],
        "input_layer.2.weight": [64],
        "body.0.res_layer.0.running_mean": [64],
        "body.0.res_layer.1.weight": [64, 64, 3, 3],
        "body.0.res_layer.5.fc1.weight": [4, 64, 1, 1],
        "body.3.shortcut_layer.0.weight": [128, 64, 1, 1],
        "body.3.shortcut_layer.1.running_var": [128],
        "body.21.shortcut_layer.0.weight": [512, 256, 1, 1],
        "body.23.res_layer.5.fc2.weight": [512, 32, 1, 1],
        "output_layer.0.weight": [512],
        "output_layer.3.weight": [512, 512 * 7 * 7],
        "output_layer.3.bias": [512],
        "output_layer.4.weight": [512],
        "output_layer.4.running_var": [512],
    }.items():
        assert list(state[key].shape) == shape, key
    assert "body.0.shortcut_layer.0.weight" not in state  # 64 → 64 at stride 2: a max-pool, no weights
    assert "body.24.res_layer.1.weight" not in state


def test_arcface_forward(arcface):
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        y = arcface(x)
    assert y.shape == (3, 512)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[batch, 3, 112, 112\]"):
        arcface(torch.zeros(1, 3, 128, 128))


def test_arcface_input_is_psp_crop():
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    torch.testing.assert_close(arcface_input(x), F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112))
    big = torch.rand(1, 3, 1024, 1024) * 2 - 1  # pSp pools its 1024 px outputs to 256 first
    expected = F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(big, 256)[:, :, 35:223, 32:220], 112)
    torch.testing.assert_close(arcface_input(big), expected)
    assert arcface_input(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 112, 112)


# The loaded network's embeddings of the seed-2 crops, recorded once: a change to the loader or to the
# architecture that still loads the file but computes something else shows here.
STORED_EMBEDDINGS = torch.tensor([[-0.06309309, -0.00381412, -0.00005638, 0.04490924],
                                  [-0.01150528, -0.00313474, -0.01364572, 0.05474482]])
"""``net(x)[:, :4]`` of the two unit-length 512-vectors."""
STORED_EMBEDDINGS_SUM = torch.tensor(-0.86447883)
STORED_COSINE = torch.tensor(0.63954169)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_arcface_official_layout_round_trip(arcface, tmp_path, zip_format):
    path = tmp_path / "model_ir_se50.pth"
    torch.save(arcface.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    loaded = load_arcface(path)
    path.unlink()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = arcface.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        embeddings = loaded(x)
        assert torch.equal(embeddings, arcface(x))
    torch.testing.assert_close(embeddings[:, :4], STORED_EMBEDDINGS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeddings.sum(), STORED_EMBEDDINGS_SUM, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeddings[0] @ embeddings[1], STORED_COSINE, atol=1e-4, rtol=1e-4)


def test_arcface_refuses_bisenet_file(tmp_path):
    path = tmp_path / "79999_iter.pth"
    torch.save(BiSeNet().state_dict(), path)
    with pytest.raises(InputError, match=r"is not an ArcFace IR-SE50 state dict \(missing input_layer.0.weight"):
        load_arcface(path)
    path.unlink()


def test_arcface_refuses_an_e4e_encoder(tmp_path):
    """e4e's encoder shares the input_layer and body names; its style heads give it away."""
    path = tmp_path / "encoder.pt"
    torch.save(Encoder4Editing(stylegan_size=64, input_size=64, widths=(8, 8, 16, 16)).state_dict(), path)
    refusal = r"is not an ArcFace IR-SE50 state dict \(missing .*; unexpected styles.0"
    with pytest.raises(InputError, match=refusal) as info:
        load_arcface(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("payload, global_name", [(CreatesMarker, "io.open"),
                                                  (RunsCommandWhenUnpickled, f"{os.system.__module__}.system")])
def test_arcface_refuses_malicious_pickle(tmp_path, payload, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "model_ir_se50.pth"
    torch.save({"input_layer.0.weight": payload(marker)}, path)
    with pytest.raises(InputError, match=f"GLOBAL {global_name}") as info:
        load_arcface(path)
    assert info.value.path == str(path)
    with pytest.raises(InputError, match="tensors-only"):
        load_arcface_identity(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe reader runs the payload: the file is malicious
    assert marker.exists()


def test_arcface_identity(arcface, astronaut_crop):
    identity = ArcFaceIdentity(arcface, batch_size=2)
    assert isinstance(identity, IdentityNet) and identity.name == "arcface_ir_se50"
    faces = np.stack([astronaut_crop, astronaut_crop[:, ::-1], astronaut_crop[::-1]]).copy()
    vectors = identity.embed(faces)
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ArcFaceIdentity(arcface, batch_size=3).embed(faces), vectors, atol=1e-5)
    assert identity.embed(faces[:0]).shape == (0, 512)
    with pytest.raises(ValueError, match="batch_size"):
        load_arcface_identity("unused.pth", batch_size=0)
