"""Stage configs: the paper's defaults, immutability, serialisation, hashing and overrides."""

from __future__ import annotations

import dataclasses
import typing
import json
import os
import pickle
import subprocess
import sys

import pytest

from stitchtime_core.config import (
    ABLATIONS,
    AlignmentConfig,
    BlendingConfig,
    EditingConfig,
    EncodingConfig,
    OutputConfig,
    PTIConfig,
    RunConfig,
    ablations_of,
    StitchingConfig,
    config_hash,
    to_dict,
    with_overrides,
)
from stitchtime_core.config import (MAX_STRENGTH, PREVIEW, SettingError, check_device, default_quality,
                                    device_defaults, preset_differences, profile_defaults, run_config)

STAGE_CONFIGS = (AlignmentConfig, EncodingConfig, PTIConfig, EditingConfig, StitchingConfig, BlendingConfig,
                 OutputConfig)

# Where profile_defaults("tiny") departs from the paper, as its docstring documents: PTI's learning
# rate and batching, and fewer stitching steps.
TINY_DEPARTURES = {("pti", "lr"), ("pti", "observations_per_frame"), ("pti", "batch_size"), ("stitching", "steps"),
                   ("encoding", "projection_steps"), ("encoding", "projection_lr")}


def _custom_config() -> RunConfig:
    return RunConfig(
        alignment=AlignmentConfig(center_sigma=2.5, scale=1.1),
        pti=PTIConfig(lr=1e-3, batch_size=3, seed=7),
        editing=EditingConfig(edits=(("age", 2.0), ("sefa:3", -1.5))),
        stitching=StitchingConfig(loss="l2", steps=7),
        output=OutputConfig(crf=23),
    )


def test_defaults_are_the_papers():
    """Section 3.5 of the paper, and the reference code's smoothing sigmas."""
    pti, stitching, alignment = PTIConfig(), StitchingConfig(), AlignmentConfig()
    assert pti.lambda_l2 == 10
    assert pti.lambda_r == 0.1
    assert pti.lambda_lpips == 1  # eq. 1 weighs LPIPS by 1
    assert pti.lr == 3e-5
    assert pti.observations_per_frame == 80
    assert stitching.lr == 3e-4
    assert stitching.steps == 100
    assert stitching.lambda_m == 0.01
    assert stitching.loss == "l1"  # eqs. 2-3 are L1 distances
    # Not the paper's (each frame from θ_p): measured to hold its result in a third of the steps.
    assert (stitching.warm_start, stitching.warm_optimizer) == (0.3, "carried")
    assert alignment.center_sigma == 1
    assert alignment.axes_sigma == 3
    assert EditingConfig().edits == ()


@pytest.mark.parametrize("cls", STAGE_CONFIGS + (RunConfig,))
def test_configs_are_frozen(cls):
    config = cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, name, getattr(config, name))


def test_to_dict_and_from_dict_round_trip_through_json():
    config = _custom_config()
    data = json.loads(json.dumps(to_dict(config)))
    assert data["editing"]["edits"] == [["age", 2.0], ["sefa:3", -1.5]]
    rebuilt = RunConfig.from_dict(data)
    assert rebuilt == config
    assert isinstance(rebuilt.editing.edits, tuple) and isinstance(rebuilt.editing.edits[0], tuple)
    assert RunConfig.from_dict(to_dict(RunConfig())) == RunConfig()
    assert RunConfig.from_dict({}) == RunConfig()  # missing stages take their defaults


def test_to_dict_of_a_dict_of_configs():
    assert to_dict({"pti": PTIConfig(lr=0.5)}) == {"pti": to_dict(PTIConfig(lr=0.5))}
    with pytest.raises(TypeError, match="not a config"):
        to_dict(3)


def test_from_dict_rejects_an_unknown_field():
    with pytest.raises(TypeError):
        RunConfig.from_dict({"pti": {"learning_rate": 1.0}})


def test_from_dict_rejects_an_unknown_stage():
    with pytest.raises(TypeError):
        RunConfig.from_dict({"pti": {}, "stiching": {"steps": 5}})


def test_config_hash_is_stable():
    config = _custom_config()
    digest = config_hash(config)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert config_hash(_custom_config()) == digest
    assert config_hash(RunConfig.from_dict(to_dict(config))) == digest
    # Key order does not matter.
    assert config_hash({"b": PTIConfig(), "a": StitchingConfig()}) == config_hash({"a": StitchingConfig(),
                                                                                  "b": PTIConfig()})
    # Nor does the process: string hashing is randomised per process, the digest must not be.
    code = ("from stitchtime_core.config import *; "
            "print(config_hash(RunConfig(pti=PTIConfig(lr=1e-3, batch_size=3, seed=7))))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outputs == {config_hash(RunConfig(pti=PTIConfig(lr=1e-3, batch_size=3, seed=7)))}


_OTHER_METHOD = {"encoding": "optimization", "pti": "none", "stitching": "none", "blending": "poisson"}


def test_config_hash_changes_with_every_field():
    base = RunConfig()
    digests = {config_hash(base)}
    changed = 0
    for stage in dataclasses.fields(RunConfig):
        part = getattr(base, stage.name)
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            # Validated strings get another allowed value.
            if f.name == "method":
                new = _OTHER_METHOD[stage.name]
            elif typing.get_origin(hints[f.name]) is typing.Literal:
                new = next(choice for choice in typing.get_args(hints[f.name]) if choice != value)
            elif f.name == "face":
                new = "1"
            elif isinstance(value, str):
                new = value + "x"
            elif isinstance(value, tuple):
                new = (("age", 1.0),)
            elif f.metadata.get("le") == 1:
                new = value / 2
            else:
                new = value + 1
            changed_part = dataclasses.replace(part, **{f.name: new})
            digests.add(config_hash(dataclasses.replace(base, **{stage.name: changed_part})))
            changed += 1
    assert len(digests) == changed + 1


def test_with_overrides_converts_command_line_strings():
    base = RunConfig()
    config = with_overrides(base, {"pti": {"lr": "1e-3", "observations_per_frame": "5"},
                                   "stitching": {"loss": "l2", "lambda_m": "1"}})
    assert config.pti.lr == 1e-3 and isinstance(config.pti.lr, float)
    assert config.pti.observations_per_frame == 5 and isinstance(config.pti.observations_per_frame, int)
    assert config.stitching.loss == "l2"
    assert config.stitching.lambda_m == 1.0 and isinstance(config.stitching.lambda_m, float)
    # Everything else is unchanged, and the input config too.
    assert dataclasses.replace(config, pti=base.pti, stitching=base.stitching) == base
    assert base == RunConfig()
    assert with_overrides(base, {}) == base


@pytest.mark.parametrize("overrides, message", [
    ({"stiching": {"steps": "5"}}, "stiching.steps is not a setting: there is no stage 'stiching'"),
    ({"pti": {"learning_rate": "1"}}, "pti.learning_rate is not a setting; pti has lr, "),
    ({"pti": {"observations_per_frame": "many"}}, "must be an int"),
    ({"pti": {"batch_size": "1.5"}}, "must be an int"),
    ({"stitching": {"lr": "fast"}}, "must be a float"),
    ({"editing": {"edits": "age"}}, "cannot be set"),
])
def test_with_overrides_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        with_overrides(RunConfig(), overrides)


def test_with_overrides_rejects_a_fractional_number_for_an_int_setting():
    with pytest.raises(ValueError):
        with_overrides(RunConfig(), {"pti": {"batch_size": 2.7}})


def test_profile_defaults():
    assert profile_defaults("ffhq") == RunConfig()
    tiny, ffhq = to_dict(profile_defaults("tiny")), to_dict(RunConfig())
    differing = {(stage, name) for stage in ffhq for name in ffhq[stage] if tiny[stage][name] != ffhq[stage][name]}
    assert differing == TINY_DEPARTURES
    with pytest.raises(ValueError, match="unknown profile"):
        profile_defaults("celeba")



def test_quality_presets():
    assert profile_defaults("mobile", "paper") == profile_defaults("ffhq", "paper") == RunConfig()
    preview, paper = to_dict(profile_defaults("mobile", "preview")), to_dict(RunConfig())
    differing = {(stage, name) for stage in paper for name in paper[stage]
                 if preview[stage][name] != paper[stage][name]}
    assert differing == {("encoding", "projection_steps"), ("encoding", "warm_start_steps"), ("pti", "lr"),
                         ("pti", "observations_per_frame"), ("pti", "lambda_r"), ("pti", "lpips_resolution"),
                         ("stitching", "lr"), ("stitching", "steps"), ("stitching", "batch_size")}
    assert preview["pti"]["observations_per_frame"] < paper["pti"]["observations_per_frame"]
    assert preview["stitching"]["steps"] < paper["stitching"]["steps"]
    assert profile_defaults("tiny", "preview") == profile_defaults("tiny", "paper")  # tiny is sized for CPUs
    assert default_quality("cuda") == "paper" and default_quality("cpu") == "preview"
    with pytest.raises(ValueError, match="unknown quality"):
        profile_defaults("mobile", "draft")


def test_on_a_cpu_the_real_profiles_stitch_one_frame_at_a_time_unless_told_otherwise():
    for profile in ("mobile", "ffhq"):
        assert run_config(profile, "paper", device="cpu").stitching.batch_size == 1
        assert run_config(profile, "paper", device="cuda:1").stitching.batch_size == 8
        assert run_config(profile, "paper").stitching.batch_size == 8  # no device: the flow fans chunks out
        assert run_config(profile, "paper", preset="stit-code", device="cpu").stitching.batch_size == 1
        cpu = run_config(profile, "paper", {"stitching": {"batch_size": "4"}}, device="cpu")
        assert cpu.stitching.batch_size == 4  # the user's setting wins
        # Only the batch: every other setting is the paper's, and the run records the difference.
        assert preset_differences(run_config(profile, "paper", device="cpu"), "paper") == {
            "stitching": {"batch_size": 1}}
    assert run_config("tiny", "paper", device="cpu").stitching.batch_size == 8  # 64 px frames gain from batches
    assert device_defaults("tiny", "cpu") == device_defaults("mobile", "cuda") == {}


def test_presets_and_how_they_combine_with_quality_and_overrides():
    assert run_config("ffhq", "paper") == run_config("ffhq", "paper", preset="paper") == RunConfig()
    code = run_config("ffhq", "paper", preset="stit-code")
    # The reference code's own defaults: L2, no warm starts, 300 passes in frame order without the
    # regulariser (its train.py), the original crop segmented, every direction file halved.
    assert (code.stitching.loss, code.stitching.warm_start, code.stitching.segment) == ("l2", 0, "crop")
    assert (code.pti.observations_per_frame, code.pti.lambda_r, code.pti.frame_order) == (300, 0, "fixed")
    assert code.editing.halve_files == "all"
    # Where the paper is silent both presets follow the reference code (faces: benchmarks/landmarks.py, the
    # regulariser's noise: benchmarks/pti_settings.py measured no reason to depart).
    for config in (RunConfig(), code):
        assert config.pti.regularizer_noise == "none"
        assert (config.alignment.detector_upsample, config.alignment.detect_max_side) == (0, 0)
        assert (config.stitching.normalise, config.stitching.early_stop_check) == ("mask", "before")
        assert (config.stitching.mask_shape, config.stitching.parse_resize) == ("square", "nearest")
        assert (config.blending.feather_shape, config.blending.feather_radius_px) == ("square", 25)
    # The quality's step counts come after the preset, the user's settings last.
    preview = run_config("mobile", "preview", {"stitching": {"steps": "7"}}, preset="stit-code")
    assert preview.pti.observations_per_frame == PREVIEW.pti.observations_per_frame
    assert preview.stitching.loss == "l2" and preview.stitching.steps == 7
    # The reference code has no warm starts, at any quality.
    assert preview.stitching.warm_start == 0 and run_config("mobile", "preview").stitching.warm_start == 0.3
    assert run_config("tiny", "paper", preset="stit-code").pti.observations_per_frame == 32
    with pytest.raises(ValueError, match="unknown preset 'stit'"):
        run_config("ffhq", "paper", preset="stit")


def test_ablations_are_settings_and_are_recognised():
    assert ablations_of(RunConfig()) == []
    for name, settings in ABLATIONS.items():
        config = with_overrides(RunConfig(), settings)
        assert ablations_of(config) == [name]
    with pytest.raises(ValueError, match="blending.method must be"):
        with_overrides(RunConfig(), {"blending": {"method": "paste"}})
    with pytest.raises(ValueError, match="pti.checkpoint_every must be >= 0"):
        with_overrides(RunConfig(), {"pti": {"checkpoint_every": "-1"}})


def test_every_choice_and_bound_is_checked_from_its_declaration():
    checked = 0
    for section in dataclasses.fields(RunConfig):
        config = getattr(RunConfig(), section.name)
        hints = typing.get_type_hints(type(config))
        for spec in dataclasses.fields(config):
            name = f"{section.name}.{spec.name}"
            if typing.get_origin(hints[spec.name]) is typing.Literal:
                with pytest.raises(ValueError, match=rf"{name} must be one of '"):
                    with_overrides(RunConfig(), {section.name: {spec.name: "nonsense"}})
                checked += 1
            for bound, step, sign in (("gt", 0, ">"), ("ge", -1, ">="), ("le", 1, "<=")):
                if bound in spec.metadata:
                    limit = spec.metadata[bound]
                    with pytest.raises(SettingError, match=rf"{name} must be {sign} {limit}, got") as error:
                        with_overrides(RunConfig(), {section.name: {spec.name: str(limit + step)}})
                    assert error.value.setting == name
                    checked += 1
            if hints[spec.name] is float:
                for bad in ("nan", "inf", "-inf", "1e400"):
                    with pytest.raises(SettingError, match=rf"{name} must be a finite number, got"):
                        with_overrides(RunConfig(), {section.name: {spec.name: bad}})
                checked += 1
    assert checked >= 60  # every method, loss and detector choice, every count, rate and weight


def test_edit_strengths_are_finite_and_bounded():
    assert EditingConfig(edits=(("age", -MAX_STRENGTH), ("smile", MAX_STRENGTH))).edits[0] == ("age", -100.0)
    for bad in (float("nan"), float("inf"), 1e30, -MAX_STRENGTH - 0.5):
        with pytest.raises(SettingError, match=r"the strength of age must be a finite number from -100 to 100"):
            EditingConfig(edits=(("age", bad),))


def test_a_setting_error_survives_pickling_with_its_setting():
    # Prefect pickles the errors of tasks and flows.
    error = pickle.loads(pickle.dumps(SettingError("pti.lr", "must be > 0, got -1")))
    assert (error.setting, str(error)) == ("pti.lr", "pti.lr must be > 0, got -1")


def test_a_run_records_what_differs_from_its_preset() -> None:
    config = run_config("mobile", "preview", {"pti": {"lr": 1e-3}}, preset="stit-code")
    differs = preset_differences(config, "stit-code")
    assert differs["pti"] == {"lr": 1e-3, "observations_per_frame": 4, "lpips_resolution": 256}  # preview, then --set
    assert differs["stitching"] == {"lr": 1e-4, "steps": 10, "batch_size": 1}  # L2, no warm starts: stit-code's own
    assert differs["encoding"] == {"projection_steps": 100, "warm_start_steps": 10}
    assert set(differs) == {"encoding", "pti", "stitching"}
    assert preset_differences(run_config("mobile", preset="stit-code"), "stit-code") == {}
    assert preset_differences(run_config("mobile"), "paper") == {}
    with pytest.raises(ValueError, match="unknown preset 'stit'"):
        preset_differences(config, "stit")


def test_a_missing_gpu_is_named_before_any_network_is_put_there() -> None:
    import torch

    from stitchtime_core.errors import DeviceError
    from stitchtime_core.models.profiles import Networks

    check_device("cpu")
    check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown device 'gpu'; choose cpu or cuda"):
        check_device("gpu")
    count = torch.cuda.device_count()
    if count:  # a GPU machine: its GPUs pass, an index past them does not
        check_device("cuda")
        check_device(f"cuda:{count - 1}")
    with pytest.raises(DeviceError) as raised:
        check_device(f"cuda:{count}")
    expected = f"only {count} CUDA GPU" if count else "no CUDA GPU is visible here (torch "
    assert str(raised.value).startswith(f"device cuda:{count}: ") and expected in raised.value.problem
    with pytest.raises(DeviceError, match=f"device cuda:{count}: "):
        Networks("tiny", device=f"cuda:{count}")  # every stage loads its networks through one
    # Prefect pickles the errors of tasks and flows.
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (copy.device, copy.problem, str(copy)) == (raised.value.device, raised.value.problem, str(raised.value))


def test_hidden_gpus_are_named_as_hidden() -> None:
    code = "from stitchtime_core.config import check_device\ncheck_device('cuda')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("stitchtime_core.errors.DeviceError: device cuda: no CUDA GPU "
                                                     "is visible here (torch ")
    assert "CUDA_VISIBLE_DEVICES=''): run with --device cpu, or where an NVIDIA GPU and its driver are" in result.stderr
