"""Read a stylegan2-ada-pytorch network pickle (``ffhq.pkl``) without running the code inside it.

The official pickles hold ``dict(G=..., D=..., G_ema=..., training_set_kwargs=..., augment_pipe=...)``.
Every network in them is a *persistent* object: the pickle stores the call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=6, module_src=<source of training/networks.py>, class_name=...,
state=<the module's __dict__>)``, and the reference loader ``exec``s ``module_src`` to get the class
back. Loading such a file with ``pickle.load`` therefore runs whatever source the file carries.

Here a restricted unpickler resolves only the globals such a pickle needs (``ALLOWED_GLOBALS``) and
refuses every other one. ``_reconstruct_persistent_obj`` is replaced by a stand-in that keeps the
class name and state of each object as a ``PersistentObject`` and never looks at ``module_src``. The
generator is then rebuilt from its recorded constructor arguments as our own ``Generator`` and its
parameters and buffers are loaded by name, strictly.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stitchtime_core.errors import InputError
from stitchtime_core.models.stylegan2 import Generator

PERSISTENCE_VERSION = 6
"""``torch_utils.persistence._version`` of stylegan2-ada-pytorch (and stylegan3)."""

GENERATOR_ARG_NAMES = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                       "synthesis_kwargs")
"""The positional parameters of ada's ``training.networks.Generator``, in order."""

MAPPING_KWARGS = frozenset({"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier",
                            "w_avg_beta"})
SYNTHESIS_KWARGS = frozenset({"channel_base", "channel_max", "num_fp16_res", "architecture", "resample_filter",
                              "conv_clamp", "fp16_channels_last", "kernel_size", "use_noise", "activation"})
"""Every keyword ada's SynthesisNetwork, SynthesisBlock and SynthesisLayer accept from the user; our
Generator implements all of them (the 'skip' architecture only), so none is dropped."""

_TORCH_SAVE_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a legacy (non-zip) torch.save file


@dataclass(frozen=True, eq=False)
class PersistentObject:
    """What a persistent object of the pickle holds, kept as data: the source code is never run.

    Attributes:
        class_name: the class in the pickled source (``Generator``, ``SynthesisLayer``...).
        state: the object's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules`` (OrderedDicts),
            ``_init_args``, ``_init_kwargs``, ``training`` and plain attributes.
    """

    class_name: str
    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:  # a BUILD opcode aimed at a stub is not ada's layout
        raise pickle.UnpicklingError("a persistent object takes no extra state")


def _persistent_object(meta: Any) -> PersistentObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: records, never executes."""
    if not isinstance(meta, dict) or not {"type", "version", "class_name", "state"} <= meta.keys():
        raise pickle.UnpicklingError("a persistent object without type, version, class_name and state")
    if meta["type"] != "class" or meta["version"] != PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(f"persistent object of type {meta['type']!r}, version {meta['version']!r}; "
                                     f"expected type 'class', version {PERSISTENCE_VERSION}")
    if not isinstance(meta["class_name"], str) or not isinstance(meta["state"], dict):
        raise pickle.UnpicklingError("a persistent object whose class_name is not a str or state not a dict")
    return PersistentObject(meta["class_name"], meta["state"])


def _load_storage(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes``: the bytes are a legacy torch.save of one storage."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage that is not given as bytes")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _check_storage_and_hooks(storage: Any, hooks: Any) -> None:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor over a {type(storage).__name__}, not a storage")
    if hooks:  # torch never pickles hooks (the dict is always empty); a callable here is not a weight
        raise pickle.UnpicklingError("a tensor with backward hooks")


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: bool, backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` after checking that it rebuilds a plain tensor."""
    _check_storage_and_hooks(storage, backward_hooks)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any,
                       state: Any = None) -> torch.nn.Parameter:
    """``torch._utils._rebuild_parameter`` (and ``_with_state``): only the values matter here, so the
    Python attributes a parameter may carry are dropped."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter over a {type(data).__name__}, not a tensor")
    _check_storage_and_hooks(data.untyped_storage(), backward_hooks)
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _numpy_multiarray() -> Any:
    try:  # numpy >= 2 pickles as numpy._core; numpy 1.x (the official files) as numpy.core
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    return {
        # The persistent networks, kept as data (their module_src is never executed).
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
        # Constructor kwargs are dnnlib EasyDicts: a dict subclass with attribute access, nothing else.
        ("dnnlib.util", "EasyDict"): dict,
        # Module state: _parameters, _buffers, _modules and the hook tables are OrderedDicts.
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Tensors and parameters as plain pickle writes them (Tensor/Parameter.__reduce_ex__) ...
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        # ... over storages written by Storage.__reduce__, read back by torch's weights-only loader.
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("torch", "Size"): torch.Size,
        # ada keeps gains as numpy scalars (weight_gain = lr_multiplier / np.sqrt(in_features)).
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # nn.Module._non_persistent_buffers_set under pickle protocols 2 and 3 (Python 3.7's default).
        ("builtins", "set"): set,
    }


ALLOWED_GLOBALS = frozenset(_allowed_globals())
"""The ``(module, name)`` pairs a stylegan2-ada network pickle may name; everything else is refused."""


class _AdaUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str | os.PathLike):
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise InputError(self._path, f"refused to load {module}.{name}: not on the allow-list of a "
                                         "stylegan2-ada network pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise InputError(self._path, "refused a persistent id: a stylegan2-ada network pickle has none "
                                     "(a torch.save file?)")


def read_ada_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a stylegan2-ada network pickle without executing the code it embeds.

    Args:
        path: the ``.pkl`` file.

    Returns:
        What the pickle holds (for an official file a dict with 'G', 'D', 'G_ema',
        'training_set_kwargs', 'augment_pipe'), each network as a ``PersistentObject`` whose state
        holds real tensors.

    Raises:
        InputError: the file is missing, is not a pickle, or names a global outside ``ALLOWED_GLOBALS``.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == b"PK\x03\x04":
                raise InputError(path, f"is not a stylegan2-ada network pickle (found {_describe_torch_save(path)})")
            f.seek(0)
            try:
                data = _AdaUnpickler(f, path).load()
            except InputError:
                raise
            except EOFError:
                raise InputError(path, "is not a stylegan2-ada network pickle (the file is empty or cut short)")
            except Exception as e:  # noqa: BLE001 - any failure to parse means "not a readable pickle"
                raise InputError(path, f"is not a readable pickle ({type(e).__name__}: {e})") from e
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a network pickle") from None
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from e
    if isinstance(data, int) and data == _TORCH_SAVE_MAGIC:
        raise InputError(path, f"is not a stylegan2-ada network pickle (found {_describe_torch_save(path)})")
    return data


def load_ada_generator(path: str | os.PathLike, *, key: str = "G_ema") -> Generator:
    """Build our ``Generator`` from the constructor arguments recorded in the pickle and load its weights.

    Args:
        path: a stylegan2-ada-pytorch network pickle (``ffhq.pkl``).
        key: which network of the pickle: ``G_ema`` (the averaged generator everyone uses) or ``G``.

    Returns:
        The generator on the CPU in float32, in eval mode, with ``requires_grad`` off (as ada saves it);
        ``init_kwargs`` are the pickle's, so fp16 resolutions (``num_fp16_res``) are kept: they run in
        half precision on a GPU and in float32 on a CPU.

    Raises:
        InputError: the file is not such a pickle, lacks ``key``, ``key`` is not a stylegan2-ada
            ``Generator``, or its parameters do not fit the architecture its arguments describe.
    """
    data = read_ada_pickle(path)
    if not isinstance(data, dict) or not any(isinstance(v, PersistentObject) for v in data.values()):
        raise InputError(path, f"is not a stylegan2-ada network pickle (found {_describe(data)})")
    if key not in data:
        held = ", ".join(repr(k) for k in data)
        raise InputError(path, f"has no {key!r} (it holds {held})")
    stub = data[key]
    if not isinstance(stub, PersistentObject) or stub.class_name != "Generator":
        raise InputError(path, f"{key!r} is {_describe(stub)}, not a stylegan2-ada Generator")
    kwargs = _generator_kwargs(path, key, stub)
    try:
        G = Generator(**kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(path, f"{key!r} has constructor arguments this generator cannot build ({e})") from e
    _check_classes(path, key, stub, G)
    tensors = _collect_tensors(path, key, stub)
    _check_names_and_shapes(path, key, tensors, G.state_dict())
    G.load_state_dict(tensors, strict=True)
    return G.eval().requires_grad_(False)


def _generator_kwargs(path: str | os.PathLike, key: str, stub: PersistentObject) -> dict[str, Any]:
    """``_init_args`` mapped onto ada's positional names, merged with ``_init_kwargs``, and checked."""
    args, kwargs = stub.state.get("_init_args", ()), stub.state.get("_init_kwargs")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise InputError(path, f"{key!r} does not record its constructor arguments (_init_args, _init_kwargs)")
    if len(args) > len(GENERATOR_ARG_NAMES):
        raise InputError(path, f"{key!r} was built with {len(args)} positional arguments; a stylegan2-ada "
                               f"Generator takes at most {len(GENERATOR_ARG_NAMES)}")
    merged = dict(zip(GENERATOR_ARG_NAMES, args))
    for name, value in kwargs.items():
        if name in merged:
            raise InputError(path, f"{key!r} got {name!r} both by position and by name")
        merged[name] = value
    unknown = sorted(set(merged) - set(GENERATOR_ARG_NAMES))
    missing = [name for name in GENERATOR_ARG_NAMES[:5] if name not in merged]
    if unknown or missing:
        raise InputError(path, f"{key!r} is not a stylegan2-ada Generator: unknown arguments {unknown}, "
                               f"missing {missing}")
    for group, known in (("mapping_kwargs", MAPPING_KWARGS), ("synthesis_kwargs", SYNTHESIS_KWARGS)):
        value = merged.get(group) or {}
        if not isinstance(value, dict):
            raise InputError(path, f"{key!r} has {group} that are {_describe(value)}, not a dict")
        extra = sorted(set(value) - known)
        if extra:
            raise InputError(path, f"{key!r} has {group} {extra} that a stylegan2-ada Generator does not take")
        merged[group] = value
    return _plain(merged)


def _plain(value: Any) -> Any:
    """Numpy scalars as Python numbers, tuples as lists: the kwargs become a JSON architecture config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_classes(path: str | os.PathLike, key: str, stub: PersistentObject, G: Generator) -> None:
    """Every pickled module must be the class of ours at the same place (same architecture, not a look-alike)."""
    ours = dict(G.named_modules())
    for name, child in _walk(path, key, stub, ""):
        if name in ours and type(ours[name]).__name__ != child.class_name:
            raise InputError(path, f"{key}.{name or '(root)'} is a {child.class_name} in the pickle but a "
                                   f"{type(ours[name]).__name__} in this generator")


def _walk(path: str | os.PathLike, key: str, stub: PersistentObject, prefix: str):
    yield prefix, stub
    modules = stub.state.get("_modules", {})
    if not isinstance(modules, dict):
        raise InputError(path, f"{key}.{prefix or '(root)'} has no module table")
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise InputError(path, f"{key}.{prefix}{name} is {_describe(child)}, not a stylegan2-ada module")
        yield from _walk(path, key, child, f"{prefix}{name}.")


def _collect_tensors(path: str | os.PathLike, key: str, stub: PersistentObject) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of the stub tree under their dotted state-dict names."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in _walk(path, key, stub, ""):
        state = module.state
        skip = state.get("_non_persistent_buffers_set") or set()
        for table in ("_parameters", "_buffers"):
            entries = state.get(table, {})
            if not isinstance(entries, dict):
                raise InputError(path, f"{key}.{prefix}{table} is not a table of tensors")
            for name, value in entries.items():
                if value is None or (table == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise InputError(path, f"{key}.{prefix}{name} is {_describe(value)}, not a tensor")
                tensors[prefix + name] = value
    return tensors


def _check_names_and_shapes(path: str | os.PathLike, key: str, tensors: dict[str, torch.Tensor],
                            expected: dict[str, torch.Tensor]) -> None:
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise InputError(path, f"{key!r} does not fit the generator its arguments describe: missing "
                               f"{_few(missing)}, unexpected {_few(unexpected)}")
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise InputError(path, f"{key}.{name} has shape {list(value.shape)} in the pickle; the generator "
                                   f"its arguments describe expects {list(expected[name].shape)}")


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _describe(obj: Any) -> str:
    if isinstance(obj, PersistentObject):
        return f"a persistent {obj.class_name}"
    if isinstance(obj, dict) and not obj:
        return "an empty dict"
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a dict of {len(obj)} tensors"
    if isinstance(obj, dict):
        return "a dict with keys " + _few([repr(k) for k in obj], limit=6)
    return f"a {type(obj).__name__}"


def _describe_torch_save(path: str | os.PathLike) -> str:
    """What a torch.save file holds, read with torch's own weights-only loader."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - the description is best effort
        return "a torch.save file that holds more than weights"
    return f"{_describe(obj)} saved with torch.save"
