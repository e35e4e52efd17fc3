"""Reading stylegan2-ada-pytorch network pickles without running their code, on faithful fakes."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
from pathlib import Path

import pytest
import torch

from fake_official import (
    MARKER_ENV,
    RunsCommandWhenUnpickled,
    fake_generator,
    fake_generator_kwargs,
    load_like_official,
    write_fake_ada_pickle,
)
from stitchtime_core.errors import InputError
from stitchtime_core.models.ada_pickle import ALLOWED_GLOBALS, PersistentObject, load_ada_generator, read_ada_pickle
from stitchtime_core.models.stylegan2 import Generator


@pytest.fixture(scope="module")
def fake_pkl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("ada") / "ffhq.pkl"
    return path, write_fake_ada_pickle(path, img_resolution=16, seed=0)


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the fake pickle's module source writes if anything executes it."""
    path = tmp_path / "module_src_was_executed"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


def _images(G: Generator) -> torch.Tensor:
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return G(z, noise_mode="const")


@pytest.mark.parametrize("protocol", [3, 4])
def test_every_tensor_of_g_ema_is_loaded_exactly(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "ffhq.pkl"
    expected = write_fake_ada_pickle(path, protocol=protocol)

    G = load_ada_generator(path)

    if protocol == 3:  # written as Python 3.7 with numpy 1.x wrote the official files
        globals_named = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}
        assert {"numpy.core.multiarray scalar", "builtins set", "dnnlib.util EasyDict"} <= globals_named
    state = G.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], value), name
    assert not G.training and not any(p.requires_grad for p in G.parameters())


def test_loaded_generator_draws_the_same_images(fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    G = load_ada_generator(fake_pkl[0])
    source = fake_generator(img_resolution=16, seed=0)
    assert torch.equal(_images(G), _images(source))
    assert G.init_kwargs == fake_generator_kwargs(16)


# What the seed-0 fake computes for the seed-1 latents of ``_images``: a change to what the loader
# builds, or to how the generator computes, that still loads this file shows here.
STORED_W = torch.tensor([[0.00107486, 0.00898716, -0.00225926, -0.00278994],
                         [0.00113387, 0.00886466, -0.00225103, -0.00286072]])
"""``mapping(z)[:, 0, :4]``; the mapping's lr multiplier of 0.01 keeps w near 1e-3, hence atol 1e-7."""
STORED_PIXELS = torch.tensor([[-4.00922585, -0.04299069, 1.17249489],
                              [-4.00955963, -0.04302943, 1.17180491]])
"""``G(z)[:, :, 8, 8]``: the centre pixel of both images."""
STORED_SUM = torch.tensor(-1146.254028)


def test_loaded_generator_gives_the_stored_numbers(fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    G = load_ada_generator(fake_pkl[0])
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws = G.mapping(z)
    images = _images(G)
    assert ws.shape == (2, 6, 32) and images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ws[:, 0, :4], STORED_W, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(images[:, :, 8, 8], STORED_PIXELS, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images.sum(), STORED_SUM, atol=1e-4, rtol=1e-4)


def test_the_fake_is_a_working_ada_pickle_for_the_official_loader(
        fake_pkl: tuple[Path, dict[str, torch.Tensor]], marker: Path) -> None:
    # The control: ada's own loading (which executes module_src) gets the same networks back, and
    # the marker shows that it ran the embedded source.
    data = load_like_official(fake_pkl[0])
    assert list(data) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    assert type(data["G_ema"]).__name__ == "Generator" and data["augment_pipe"] is None
    assert type(data["G_ema"]._init_kwargs["synthesis_kwargs"]).__name__ == "EasyDict"
    assert torch.equal(_images(data["G_ema"]), _images(fake_generator(img_resolution=16, seed=0)))
    assert marker.exists()


def test_module_src_is_never_executed(fake_pkl: tuple[Path, dict[str, torch.Tensor]], marker: Path) -> None:
    data = read_ada_pickle(fake_pkl[0])
    load_ada_generator(fake_pkl[0])
    load_ada_generator(fake_pkl[0], key="G")

    assert not marker.exists()
    assert isinstance(data["G_ema"], PersistentObject) and data["G_ema"].class_name == "Generator"
    assert data["D"].class_name == "Discriminator"
    assert "module_src" not in vars(data["G_ema"])


def test_g_is_loaded_when_asked_for(fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    G = load_ada_generator(fake_pkl[0], key="G")
    assert torch.equal(_images(G), _images(fake_generator(img_resolution=16, seed=1)))


def test_fp16_resolutions_are_kept_and_the_generator_runs_in_float32_on_a_cpu(
        fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    G = load_ada_generator(fake_pkl[0])
    stub = read_ada_pickle(fake_pkl[0])["G_ema"]

    assert G.init_kwargs["synthesis_kwargs"]["num_fp16_res"] == 2
    assert G.init_kwargs["synthesis_kwargs"]["conv_clamp"] == 256
    pickled_fp16 = {name: block.state["use_fp16"] for name, block in stub.state["_modules"]["synthesis"]
                    .state["_modules"].items()}
    assert pickled_fp16 == {"b4": False, "b8": True, "b16": True}
    assert {f"b{res}": getattr(G.synthesis, f"b{res}").use_fp16 for res in (4, 8, 16)} == pickled_fp16
    images = _images(G)
    assert images.dtype == torch.float32 and images.isfinite().all()
    json.dumps(G.init_kwargs)  # the architecture config saved beside safetensors weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_blocks_run_in_half_precision_on_a_gpu(fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    G = load_ada_generator(fake_pkl[0]).cuda()
    ws = G.mapping(torch.randn([2, G.z_dim], device="cuda"))
    with torch.no_grad():
        half = G.synthesis(ws, noise_mode="const")
        full = G.synthesis(ws, noise_mode="const", force_fp32=True)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_a_malicious_payload_is_refused_and_never_runs(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "ffhq.pkl"
    touched = tmp_path / "payload_ran"
    write_fake_ada_pickle(path, extra_payload=RunsCommandWhenUnpickled(touched))

    with pytest.raises(InputError) as err:
        load_ada_generator(path)

    assert err.value.path == str(path)
    assert f"refused to load {os.system.__module__}.system" in str(err.value)
    assert "allow-list" in str(err.value)
    assert not touched.exists() and not marker.exists()


def test_the_payload_would_run_under_plain_pickle(tmp_path: Path) -> None:
    # The control: the payload is real.
    touched = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(RunsCommandWhenUnpickled(touched)))
    assert touched.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "exec"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("copyreg", "_reconstructor"),
    ("torch", "load"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("training.networks", "Generator"),
    ("torch_utils.persistence", "_src_to_module"),
])
def test_any_other_global_is_refused(tmp_path: Path, module: str, name: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(f"c{module}\n{name}\n(S'1'\ntR.".encode())  # protocol 0: module.name('1')
    with pytest.raises(InputError, match=rf"refused to load {module}\.{name}: not on the allow-list"):
        read_ada_pickle(path)


def test_the_allow_list_is_what_an_ada_pickle_needs() -> None:
    assert ALLOWED_GLOBALS == {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("dnnlib.util", "EasyDict"),
        ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "_load_from_bytes"), ("torch", "Size"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "set"),
    }


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", "x") if isinstance(obj, torch.Tensor) else None

    buffer = io.BytesIO()
    WithPersistentIds(buffer, protocol=2).dump({"w": torch.zeros(2)})
    path = tmp_path / "pid.pkl"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match="refused a persistent id"):
        read_ada_pickle(path)


def test_files_that_are_not_pickles(tmp_path: Path) -> None:
    text, empty = tmp_path / "notes.pkl", tmp_path / "empty.pkl"
    text.write_text("these are not the weights you are looking for\n")
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="is not a readable pickle"):
        load_ada_generator(text)
    with pytest.raises(InputError, match="empty or cut short"):
        load_ada_generator(empty)
    with pytest.raises(InputError, match="does not exist"):
        load_ada_generator(tmp_path / "missing.pkl")


def test_missing_or_wrong_key(fake_pkl: tuple[Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(InputError, match=r"has no 'G_avg' \(it holds 'training_set_kwargs', 'G', 'D', 'G_ema'"):
        load_ada_generator(fake_pkl[0], key="G_avg")
    with pytest.raises(InputError, match="'D' is a persistent Discriminator, not a stylegan2-ada Generator"):
        load_ada_generator(fake_pkl[0], key="D")
    with pytest.raises(InputError, match="'augment_pipe' is a NoneType, not a stylegan2-ada Generator"):
        load_ada_generator(fake_pkl[0], key="augment_pipe")


def _bisenet_like_state() -> dict[str, torch.Tensor]:
    return {"cp.resnet.conv1.weight": torch.randn(8, 3, 7, 7), "cp.resnet.bn1.weight": torch.ones(8),
            "conv_out.conv_out.weight": torch.randn(19, 8, 1, 1)}


@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "pickle"])
def test_a_state_dict_is_not_a_network_pickle(tmp_path: Path, how: str) -> None:
    path = tmp_path / "79999_iter.pth"
    if how == "pickle":
        path.write_bytes(pickle.dumps(_bisenet_like_state()))
    else:
        torch.save(_bisenet_like_state(), path, _use_new_zipfile_serialization=(how == "torch.save"))
    with pytest.raises(InputError, match=r"is not a stylegan2-ada network pickle \(found a dict of 3 tensors"):
        load_ada_generator(path)


def _kwargs_with(**synthesis: object) -> dict[str, object]:
    kwargs = fake_generator_kwargs(16)
    kwargs["synthesis_kwargs"] = {**kwargs["synthesis_kwargs"], **synthesis}
    return kwargs


@pytest.mark.parametrize("recorded, message", [
    (_kwargs_with(channel_max=16), r"G_ema.synthesis.b4.const has shape \[32, 4, 4\] in the pickle; .* \[16, 4, 4\]"),
    ({**fake_generator_kwargs(16), "mapping_kwargs": {"num_layers": 3}}, r"missing mapping.fc2.weight"),
    (_kwargs_with(architecture="resnet"), r"cannot build .*'skip'"),
    (_kwargs_with(channels_per_group=4), r"synthesis_kwargs \['channels_per_group'\] that a stylegan2-ada Generator"),
])
def test_weights_that_do_not_fit_the_recorded_arguments(tmp_path: Path, recorded: dict, message: str) -> None:
    path = tmp_path / "ffhq.pkl"
    write_fake_ada_pickle(path, recorded_kwargs=recorded)
    with pytest.raises(InputError, match=message) as err:
        load_ada_generator(path)
    assert err.value.path == str(path)
