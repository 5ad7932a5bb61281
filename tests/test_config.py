"""Every group option composes; bad values fail with key, value and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ValidationError

from amrc_exp.compress.config import ALLOCATORS
from amrc_exp.data import DATASETS
from amrc_exp.experiment.config import LOGGERS, validate
from amrc_exp.math.compensate import Z_TYPES
from amrc_exp.math.decompose import METHODS
from amrc_exp.errors import ConfigError
from tests.conftest import CONF_DIR, CliResult, compose_cfg, run_cli

GROUPS = ("model", "data", "decomp", "schedule", "z_type", "logger")
ROOT = Path(__file__).resolve().parents[1]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group):
    options = _options(group)
    assert options, f"no options in conf/{group}"
    for option in options:
        cfg = compose_cfg([f"{group}={option}", "out_dir=."])
        validate(cfg)
        node = cfg[group]
        if group == "model":
            assert node.name  # timm name or registered embedded model
        else:
            assert node.name == option


def test_group_options_match_what_the_code_implements():
    """Every implemented choice has a config option and every option an implementation (the
    registries the checks read: decompositions, schedules, Z types, datasets, loggers)."""
    for group, allowed in (("data", DATASETS), ("decomp", METHODS), ("schedule", ALLOCATORS),
                           ("z_type", Z_TYPES), ("logger", LOGGERS)):
        assert set(_options(group)) == set(allowed), group


@pytest.mark.parametrize("overrides", [
    ["model=swin_b", "ratio=0.5"],
    ["model=deit_b", "ratio=0.4", "decomp=asvd_whiten", "zfit.solver=closed_form"],
    ["decomp=svd", "schedule=uniform", "z_type=none"],
    ["model=vit_l", "target_params=86000000"],
    ["model=deit_b", "ptq.bits=8", "logger=none"],
    ["model=deit_b", "model.weights=random", "data=synthetic"],
])
def test_readme_overrides_compose(overrides):
    cfg = compose_cfg(overrides + ["out_dir=."])
    validate(cfg)
    if "model=swin_b" in overrides:
        assert cfg.model.name == "swin_base_patch4_window7_224" and cfg.ratio == 0.5


@pytest.mark.parametrize("override,key", [
    ("ratio=0", "ratio"), ("ratio=1", "ratio"), ("ratio=-0.2", "ratio"), ("ratio=1.5", "ratio"),
    ("calib.num_samples=-1", "calib.num_samples"), ("calib.num_samples=0", "calib.num_samples"),
    ("zfit.iters=0", "zfit.iters"), ("schedule.iters=-5", "schedule.iters"),
    ("finetune.epochs=-1", "finetune.epochs"), ("finetune.feature_weight=-0.5", "finetune.feature_weight"),
    ("ptq.bits=3000", "ptq.bits"), ("seed=-1", "seed"), ("seed=4294967296", "seed"), ("z_type.fraction=1.5", "z_type.fraction"),
    ("target_params=0", "target_params"),
])
def test_bad_values_name_key_value_and_allowed(override, key):
    cfg = compose_cfg([override, "out_dir=."])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert err.value.key == key and key in msg and "expected" in msg
    assert override.split("=", 1)[1] in msg


@pytest.mark.parametrize("override,allowed", [
    ("zfit.solver=adam", "gd, closed_form"), ("device=tpu", "auto, cpu, cuda"),
    ("logger.mode=sometimes", "offline, online, disabled"), ("decomp.name=svdd", "svd, asvd_mean, asvd_whiten"),
    ("schedule.name=cosine", "exp, linear, oneshot, uniform"), ("data.name=cifar", "fashion_mnist, imagenet, synthetic"),
])
def test_bad_choice_fails_at_compose_naming_key_value_and_allowed(override, allowed):
    """Choice fields are Enums built from the implementing registries: OmegaConf refuses a bad
    value while composing, before any run code."""
    with pytest.raises((ConfigCompositionException, HydraException)) as err:
        compose_cfg([override, "out_dir=."])
    key, value = override.split("=")
    cause = str(err.value.__cause__)
    assert value in cause and allowed in cause and key in cause


def test_library_configs_take_plain_strings_and_check_them():
    from amrc_exp.compress import AMRCConfig, DecompConfig, ZFitConfig

    cfg = AMRCConfig(decomp=DecompConfig("asvd_whiten"), zfit=ZFitConfig(solver="closed_form"))
    assert cfg.decomp.name == "asvd_whiten" and f"{cfg.zfit.solver}" == "closed_form"
    with pytest.raises(ConfigError, match=r"zfit.solver='adam': expected one of gd, closed_form"):
        ZFitConfig(solver="adam")
    from amrc_exp.compress import ScheduleConfig

    with pytest.raises(ConfigError, match=r"schedule.check_uniform='yes': expected true or false"):
        ScheduleConfig("output_aware", check_uniform="yes")
    with pytest.raises(ConfigError, match=r"schedule.check_uniform=True: expected false with schedule.name=exp"):
        ScheduleConfig("exp", check_uniform=True)
    with pytest.raises(ConfigError, match=r"schedule.refine_steps=-1: expected an integer >= 0"):
        ScheduleConfig("output_aware", refine_steps=-1)
    with pytest.raises(ConfigError, match=r"schedule.refine_steps=5: expected 0 with schedule.name=param_uniform"):
        ScheduleConfig("param_uniform", refine_steps=5)


def test_data_choices_are_the_data_registry():
    from amrc_exp.data import DataConfig, DataName

    assert {m.value for m in DataName} == set(DATASETS) == {"fashion_mnist", "imagenet", "synthetic"}
    with pytest.raises(ConfigError, match=r"data.name='mnist': expected one of fashion_mnist, imagenet, synthetic"):
        DataConfig(name="mnist")


@pytest.mark.parametrize("override", ["ratio=abc", "calib.num_samples=lots", "seed=1.5", "schedule.check_uniform=maybe",
                                      "schedule.refine_steps=lots"])
def test_wrong_type_fails_at_compose(override):
    with pytest.raises((ValidationError, ConfigCompositionException, HydraException)) as err:
        compose_cfg([override, "out_dir=."])
    assert override.split("=")[0] in str(err.value) or override.split("=")[0] in repr(err.value.__cause__)


def test_unknown_group_option_lists_choices():
    with pytest.raises((ConfigCompositionException, HydraException)) as err:
        compose_cfg(["model=resnet50", "out_dir=."])
    assert "model/resnet50" in str(err.value)


def _cli(*args: str) -> CliResult:
    """The console script's entry, in this process (`tests.conftest.run_cli`)."""
    return run_cli(list(args))


@pytest.mark.parametrize("args,needle", [
    (["ratio=1.5", "logger=none"], "ratio=1.5"),
    (["model=nope"], "Available options in 'model'"),
    (["ratio=abc"], "ratio"),
    (["finetune.epochs=-2", "logger=none"], "finetune.epochs"),
])
def test_cli_bad_input_is_short_clear_and_nonzero(args, needle):
    proc = _cli(*args, "hydra.run.dir=" + str(ROOT / "outputs" / "_test_cli"))
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_groups_and_cfg_prints_config():
    help_out = _cli("--help").stdout
    for group in GROUPS:
        assert f"{group}:" in help_out
    cfg_out = _cli("model=swin_b", "ratio=0.5", "--cfg", "job").stdout
    assert "swin_base_patch4_window7_224" in cfg_out and "ratio: 0.5" in cfg_out


def test_tests_run_on_the_cpu_and_users_get_auto(monkeypatch):
    """The suite pins AMRC_DEVICE=cpu (its expected numbers are CPU fp32); a user's run
    composes `device: auto` (the GPU when one is visible)."""
    assert compose_cfg(["out_dir=."]).device.value == "cpu"
    monkeypatch.delenv("AMRC_DEVICE")
    assert compose_cfg(["out_dir=."]).device.value == "auto"
    monkeypatch.setenv("AMRC_DEVICE", "cuda")
    assert compose_cfg(["out_dir=."]).device.value == "cuda"


def test_device_defaults_for_loaders_and_memory_on_the_cpu():
    """CPU defaults stay what the CPU numbers were measured with: no loader workers, no pinned
    memory, 256 MiB of H per batched Z fit, 2 GiB of mini-batch Grams."""
    from amrc_exp.compress.calibrate import chunk_budget_gib
    from amrc_exp.compress.compensate import GROUP_H_BYTES, group_h_bytes
    from amrc_exp.data import loader_options

    cfg = validate(compose_cfg(["out_dir=."]))
    assert cfg.data.num_workers is None
    assert loader_options(cfg.data, "cpu") == {"num_workers": 0, "pin_memory": False}
    assert loader_options(cfg.data, "cuda")["pin_memory"] is True
    assert group_h_bytes(torch.device("cpu")) == GROUP_H_BYTES == 256 * 2**20
    assert chunk_budget_gib(None, "cpu") == 2.0 and chunk_budget_gib(0.5, "cpu") == 0.5


@pytest.mark.parametrize("override,closest", [
    ("+finetune.epoch=0", "finetune.epochs"), ("+zfit.solvr=gd", "zfit.solver"), ("+foo=1", None),
    ("+data.eval_subst=10", "data.eval_subset"),
])
def test_keys_outside_the_schema_are_refused_even_with_plus(override, closest):
    """`+finetune.epoch=0` used to start a 20-epoch run: a key the schema lacks is an error
    naming the closest valid key, before any work."""
    from amrc_exp.errors import UnknownKeyError

    with pytest.raises(UnknownKeyError) as err:
        validate(compose_cfg([override, "out_dir=."]))
    assert err.value.key == override[1:].split("=")[0] and err.value.closest == closest
    assert (f"did you mean {closest}?" if closest else "no such key") in str(err.value)


def test_free_form_model_kwargs_stay_open():
    cfg = validate(compose_cfg(["+model.kwargs.depth=2", "+model.kwargs.drop_path_rate=0.1", "out_dir=."]))
    assert cfg.model.kwargs == {"depth": 2, "drop_path_rate": 0.1}


def test_cli_typo_names_the_closest_key_not_the_plus_form():
    proc = _cli("zfit.solvr=gd", "logger=none", "hydra.run.dir=" + str(ROOT / "outputs" / "_test_cli"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown config key zfit.solvr='gd': did you mean zfit.solver?" in proc.stderr
    assert "+zfit.solvr" not in proc.stderr


def test_cfg_job_resolve_prints_the_resolved_config():
    proc = _cli("--cfg", "job", "--resolve")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "out_dir: ." in proc.stdout and "${" not in proc.stdout
