"""Synthetic files with the exact layout of official model files, for the loader tests.

The official files cannot be downloaded here, so each loader is proven on a small file written the
way the official code writes it. ``write_fake_ada_pickle`` reproduces a stylegan2-ada-pytorch
training snapshot (``training/training_loop.py``: ``pickle.dump(dict(training_set_kwargs=...,
G=..., D=..., G_ema=..., augment_pipe=...))``) with ada's persistence mechanism
(``torch_utils/persistence.py``): every network is pickled as
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, meta holding the source code of its
module, its class name and its ``__dict__``; constructor kwargs are ``dnnlib.util.EasyDict``s;
tensors are pickled as plain ``pickle`` does (storages through ``torch.storage._load_from_bytes``).
The fake ``torch_utils`` and ``dnnlib`` modules exist in ``sys.modules`` only while pickling.

The embedded source (``MODULE_SRC``) writes a marker file when executed, at the path in the
environment variable ``MARKER_ENV``: a loader that runs it is caught.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import pickletools
import shlex
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from stitchtime_core.models.stylegan2 import (
    FullyConnectedLayer,
    Generator,
    MappingNetwork,
    SynthesisBlock,
    SynthesisLayer,
    SynthesisNetwork,
    ToRGBLayer,
    setup_filter,
)

MARKER_ENV = "STITCHTIME_FAKE_ADA_MARKER"
"""Executing ``MODULE_SRC`` writes a file at the path this environment variable names."""

PERSISTENCE_VERSION = 6

MODULE_SRC = f'''"""Stand-in for stylegan2-ada-pytorch's training/networks.py, as a fake network pickle embeds it."""
import os
import pathlib

import torch

_marker = os.environ.get("{MARKER_ENV}")
if _marker:
    pathlib.Path(_marker).write_text("module_src was executed\\n")

from stitchtime_core.models.stylegan2 import (FullyConnectedLayer, Generator, MappingNetwork, SynthesisBlock,
                                              SynthesisLayer, SynthesisNetwork, ToRGBLayer)


class Conv2dLayer(torch.nn.Module):
    pass


class DiscriminatorBlock(torch.nn.Module):
    pass


class MinibatchStdLayer(torch.nn.Module):
    pass


class DiscriminatorEpilogue(torch.nn.Module):
    pass


class Discriminator(torch.nn.Module):
    pass
'''


def fake_generator_kwargs(img_resolution: int = 16) -> dict[str, Any]:
    """A small generator's arguments, as a real ada training run records them (``train.py`` 'auto' spec:
    ``num_fp16_res=4, conv_clamp=256``; two fp16 resolutions here since the network is tiny)."""
    return dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=img_resolution, img_channels=3,
                mapping_kwargs=dict(num_layers=2),
                synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=2, conv_clamp=256))


def fake_generator(*, img_resolution: int = 16, seed: int = 0) -> Generator:
    """A tiny generator with every parameter and buffer random (noise strengths, biases and w_avg too)."""
    gen = torch.Generator().manual_seed(seed)
    G = Generator(**fake_generator_kwargs(img_resolution))
    with torch.no_grad():
        for name, t in G.state_dict().items():
            if name.endswith("resample_filter"):
                continue
            noise = torch.randn(t.shape, generator=gen)
            t.copy_(1 + 0.2 * noise if name.endswith("affine.bias") else noise * (0.5 if t.ndim < 2 else 1.0))
    return G.eval().requires_grad_(False)


class EasyDict(dict):
    """``dnnlib.util.EasyDict`` as ada defines it: a dict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


EasyDict.__module__ = "dnnlib.util"


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:
    """What ada's loader does with a persistent object: exec its module source, then rebuild it.

    Only ``load_like_official`` lets the unpickler call this (it is the control that shows the
    marker mechanism works); when writing, the pickler only records its name.
    """
    meta = EasyDict(meta)
    assert meta.version == PERSISTENCE_VERSION and meta.type == "class"
    module = types.ModuleType("_imported_module_fake")
    exec(meta.module_src, module.__dict__)  # noqa: S102 - deliberately what the official loader does
    obj_class = _persistent_class(module.__dict__[meta.class_name])
    obj = obj_class.__new__(obj_class)
    obj.__setstate__(dict(meta.state))
    return obj


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"

_DECORATED: dict[type, type] = {}


def _persistent_class(orig_class: type) -> type:
    """ada's ``persistence.persistent_class``: a subclass that pickles as a persistent object."""
    if orig_class in _DECORATED:
        return _DECORATED[orig_class]

    class Decorator(orig_class):  # type: ignore[misc, valid-type]
        _orig_module_src = MODULE_SRC
        _orig_class_name = orig_class.__name__

        def __reduce__(self) -> tuple[Any, ...]:
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    _DECORATED[orig_class] = Decorator
    return Decorator


@contextlib.contextmanager
def _ada_modules() -> Iterator[None]:
    """``torch_utils.persistence`` and ``dnnlib.util`` in ``sys.modules``, only for the duration."""
    torch_utils, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    torch_utils.persistence, dnnlib.util = persistence, util
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = EasyDict
    fakes = {"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
             "dnnlib.util": util}
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _make_persistent(root: nn.Module, init_args: Callable[[str, nn.Module], tuple[tuple, dict]]) -> None:
    """Turn every module of ``root`` into a persistent object, as ada's decorated classes are."""
    for name, module in list(root.named_modules()):
        args, kwargs = init_args(name, module)
        module.__class__ = _persistent_class(type(module))
        module._init_args = copy.deepcopy(args)
        module._init_kwargs = copy.deepcopy(kwargs)
        module.__dict__.pop("init_kwargs", None)  # ours is an attribute; ada's a property, not pickled
        # ada computes these gains with numpy, so its pickles hold numpy scalars.
        if isinstance(module, (FullyConnectedLayer, ToRGBLayer)):
            module.weight_gain = np.float64(module.weight_gain)
        if isinstance(module, SynthesisLayer):
            module.act_gain = np.float64(np.sqrt(2))


def _generator_init_args(kwargs: dict[str, Any]) -> Callable[[str, nn.Module], tuple[tuple, dict]]:
    """The ``_init_args``/``_init_kwargs`` ada records for each module of a Generator built with ``kwargs``."""
    synthesis = dict(kwargs["synthesis_kwargs"])
    mapping = dict(kwargs["mapping_kwargs"])
    block_kwargs = {k: v for k, v in synthesis.items() if k not in ("channel_base", "channel_max", "num_fp16_res")}
    layer_kwargs = {k: v for k, v in block_kwargs.items()
                    if k not in ("architecture", "resample_filter", "conv_clamp", "fp16_channels_last")}
    conv_clamp = synthesis.get("conv_clamp")

    def init_args(name: str, m: nn.Module) -> tuple[tuple, dict]:
        if isinstance(m, Generator):  # train.py's G_kwargs, then training_loop's common_kwargs
            return (), dict(z_dim=kwargs["z_dim"], w_dim=kwargs["w_dim"], mapping_kwargs=EasyDict(mapping),
                            synthesis_kwargs=EasyDict(synthesis), c_dim=kwargs["c_dim"],
                            img_resolution=kwargs["img_resolution"], img_channels=kwargs["img_channels"])
        if isinstance(m, MappingNetwork):
            return (), dict(z_dim=m.z_dim, c_dim=m.c_dim, w_dim=m.w_dim, num_ws=m.num_ws, **mapping)
        if isinstance(m, SynthesisNetwork):
            return (), dict(w_dim=m.w_dim, img_resolution=m.img_resolution, img_channels=m.img_channels, **synthesis)
        if isinstance(m, SynthesisBlock):
            return (m.in_channels, m.conv1.weight.shape[0]), dict(
                w_dim=kwargs["w_dim"], resolution=m.resolution, img_channels=kwargs["img_channels"],
                is_last=m.is_last, use_fp16=m.use_fp16, **block_kwargs)
        if isinstance(m, SynthesisLayer):
            out_channels, in_channels = m.weight.shape[:2]
            layer = dict(w_dim=kwargs["w_dim"], resolution=m.resolution)
            if m.up != 1:
                layer.update(up=m.up, resample_filter=synthesis.get("resample_filter", [1, 3, 3, 1]))
            return (in_channels, out_channels), dict(**layer, conv_clamp=conv_clamp, channels_last=False,
                                                     **layer_kwargs)
        if isinstance(m, ToRGBLayer):
            return tuple(m.weight.shape[1::-1]), dict(w_dim=kwargs["w_dim"], conv_clamp=conv_clamp,
                                                      channels_last=False)
        if isinstance(m, FullyConnectedLayer):
            features = (m.weight.shape[1], m.weight.shape[0])
            if name.endswith("affine"):
                return features, dict(bias_init=1)
            return features, dict(activation=m.activation, lr_multiplier=m.bias_gain)
        raise TypeError(f"no ada constructor for {type(m).__name__} at {name!r}")

    return init_args


# A small discriminator with ada's class and parameter names (it is never run: loaders skip 'D').

class Conv2dLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "linear", down: int = 1):
        super().__init__()
        self.activation, self.up, self.down, self.conv_clamp = activation, 1, down, None
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = np.float64(np.sqrt(2) if activation == "lrelu" else 1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self._init_args = (in_channels, out_channels)
        self._init_kwargs = dict(kernel_size=kernel_size, activation=activation, trainable=True, conv_clamp=None,
                                 channels_last=False) | ({"down": down} if down != 1 else {})


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, *, resolution: int):
        super().__init__()
        self.in_channels, self.resolution, self.architecture = in_channels, resolution, "resnet"
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(3, tmp_channels, 1, activation="lrelu")
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu")
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)
        self._init_args = (in_channels, tmp_channels, out_channels)
        self._init_kwargs = dict(resolution=resolution, first_layer_idx=0, use_fp16=False, img_channels=3,
                                 architecture="resnet", conv_clamp=256)


class MinibatchStdLayer(nn.Module):
    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels
        self._init_args, self._init_kwargs = (), dict(group_size=group_size, num_channels=num_channels)


class DiscriminatorEpilogue(nn.Module):
    def __init__(self, in_channels: int, *, resolution: int):
        super().__init__()
        self.mbstd = MinibatchStdLayer(4)
        self.conv = Conv2dLayer(in_channels + 1, in_channels, 3, activation="lrelu")
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1)
        self.fc._init_args, self.fc._init_kwargs = (in_channels * resolution ** 2, in_channels), {"activation": "lrelu"}
        self.out._init_args, self.out._init_kwargs = (in_channels, 1), {}
        self._init_args = (in_channels,)
        self._init_kwargs = dict(cmap_dim=0, resolution=resolution, img_channels=3, architecture="resnet",
                                 mbstd_group_size=4, mbstd_num_channels=1, activation="lrelu", conv_clamp=256)


class Discriminator(nn.Module):
    def __init__(self, *, img_resolution: int, channels: int = 8):
        super().__init__()
        res = img_resolution
        while res > 4:
            setattr(self, f"b{res}", DiscriminatorBlock(0 if res == img_resolution else channels, channels, channels,
                                                        resolution=res))
            res //= 2
        self.b4 = DiscriminatorEpilogue(channels, resolution=4)
        self._init_args = ()
        self._init_kwargs = dict(c_dim=0, img_resolution=img_resolution, img_channels=3,
                                 channel_base=256, channel_max=channels, num_fp16_res=2,
                                 conv_clamp=256, block_kwargs=EasyDict(), mapping_kwargs=EasyDict(),
                                 epilogue_kwargs=EasyDict(mbstd_group_size=4))


def _own_init_args(name: str, m: nn.Module) -> tuple[tuple, dict]:
    return m._init_args, m._init_kwargs


def write_fake_ada_pickle(path: str | os.PathLike, *, img_resolution: int = 16, seed: int = 0,
                          extra_payload: Any = None, protocol: int = 3,
                          recorded_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Write a network pickle laid out exactly as a stylegan2-ada-pytorch training snapshot.

    Args:
        path: where to write the ``.pkl``.
        img_resolution: the generators' resolution.
        seed: ``G_ema`` is ``fake_generator(seed=seed)``, ``G`` is ``fake_generator(seed=seed + 1)``.
        extra_payload: any object, pickled last under the key ``'extra'`` (e.g. one whose ``__reduce__``
            runs a command: a loader must refuse it).
        protocol: the pickle protocol; 3 is the default of Python 3.7, which stylegan2-ada-pytorch used.
            With protocols up to 3, numpy's globals are spelled as numpy 1.x (the official files) did.
        recorded_kwargs: constructor arguments to record for ``G`` and ``G_ema`` instead of the ones
            they were built with (to make a pickle whose weights do not fit its arguments).

    Returns:
        The state dict ``G_ema`` holds (what a correct loader must give back).
    """
    kwargs = fake_generator_kwargs(img_resolution)
    G_ema = fake_generator(img_resolution=img_resolution, seed=seed)
    expected = {k: v.clone() for k, v in G_ema.state_dict().items()}
    G_ema = copy.deepcopy(G_ema)
    G = fake_generator(img_resolution=img_resolution, seed=seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        D = Discriminator(img_resolution=img_resolution).eval().requires_grad_(False)
    recorded = recorded_kwargs or kwargs
    _make_persistent(G_ema, _generator_init_args(recorded))
    _make_persistent(G, _generator_init_args(recorded))
    _make_persistent(D, _own_init_args)
    data: dict[str, Any] = dict(
        training_set_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="~/datasets/ffhq.zip",
                                 use_labels=False, max_size=70000, xflip=True, resolution=img_resolution),
        G=G, D=D, G_ema=G_ema, augment_pipe=None,
    )
    if extra_payload is not None:
        data["extra"] = extra_payload
    with _ada_modules():
        payload = pickle.dumps(data, protocol=protocol)
    if protocol <= 3:
        payload = _spell_numpy_as_1x(payload)
    Path(path).write_bytes(payload)
    return expected


def _spell_numpy_as_1x(payload: bytes) -> bytes:
    """Rename ``numpy._core`` globals (numpy 2) to ``numpy.core`` (numpy 1.x), as in the official files.

    Protocols up to 3 name globals with the newline-terminated GLOBAL opcode and hold no offsets, so
    rewriting its argument in place leaves a valid pickle.
    """
    parts, start = [], 0
    for op, arg, pos in pickletools.genops(payload):
        if op.name == "GLOBAL" and arg.startswith("numpy._core."):
            module, name = arg.split(" ")
            parts += [payload[start:pos], b"c" + module.replace("numpy._core.", "numpy.core.").encode()
                      + b"\n" + name.encode() + b"\n"]
            start = pos + 1 + len(module) + 1 + len(name) + 1
    return b"".join(parts) + payload[start:]


def load_like_official(path: str | os.PathLike) -> Any:
    """Unpickle as stylegan2-ada-pytorch's own loader does: it EXECUTES each object's module source.

    The control of the tests: it shows that the fake pickle is a working ada pickle and that its
    source leaves the marker when run. Never use it on a file you did not write.
    """
    with _ada_modules(), open(path, "rb") as f:
        return pickle.load(f)


class RunsCommandWhenUnpickled:
    """A malicious payload: unpickling it runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def seeded_weights(net: nn.Module, *, seed: int) -> nn.Module:
    """``net`` with every parameter and buffer drawn from a seeded ``torch.Generator``, in eval mode.

    The values do not depend on the module's own initialisation code (nor on the global RNG), so
    numbers computed from them and stored in a test change only when the computation changes.
    Weights are scaled by 1/sqrt(fan_in) to keep activations of order one through deep networks;
    batch-norm statistics are non-trivial so that a loader that skipped a buffer is caught.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(t.shape, generator=gen)

    with torch.no_grad():
        for module in net.modules():
            tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
            for name, t in tensors.items():
                if not t.is_floating_point():
                    continue
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    low, high = {"weight": (0.8, 1.2), "running_var": (0.5, 1.5)}.get(name, (-0.1, 0.1))
                    t.copy_(uniform(t, low, high))
                elif t.ndim >= 2:
                    t.copy_(torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5)
                else:
                    t.copy_(uniform(t, -0.1, 0.1))
    return net.eval()
