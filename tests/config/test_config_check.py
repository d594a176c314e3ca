"""One place per setting: a key that no component reads stops the run, method arguments live in ``method``."""

import inspect
import json

import pytest
from monai.bundle import ConfigParser

from bundle.config.unread_keys import check_config_keys, method_parameters, unread_keys
from tests.conftest import REPO_ROOT
from tests.training_helpers import make_workflow

METHOD_DIR = REPO_ROOT / "configs" / "methods"
PRESETS = sorted(p.stem for p in METHOD_DIR.glob("*.json") if not p.stem.endswith("_inference"))


def failure_text(error: BaseException) -> str:
    """The messages of ``error`` and of its causes (MONAI wraps component errors)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__
    return " | ".join(texts)


def test_train_json_is_method_agnostic_and_small():
    config = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    assert len(config) <= 35  # 30 + the data settings (dataset_info, spacing, intensity, data_settings, model_settings)
    assert not {"loss_weights", "efs_percentile", "cr_threshold", "rampup_iters", "network_a_def"} & set(config)
    assert unread_keys(config) == []


@pytest.mark.parametrize("preset", PRESETS)
def test_overlay_states_only_arguments_its_method_takes_and_no_default_twice(preset):
    overlay = json.loads((METHOD_DIR / f"{preset}.json").read_text())
    method = overlay["method"]
    parameters = method_parameters(method["_target_"])
    assert parameters, method["_target_"]
    for name, value in method.items():
        if name.startswith("_"):
            continue
        assert name in parameters, f"{preset}: {name}"
        default = parameters[name].default
        assert default is inspect.Parameter.empty or value != default, f"{preset}: {name} restates its default"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"efs_percentile": 80}, "efs_percentile (no component reads it)"),  # a dual-network key on Mean Teacher
        ({"noise_std": 0.5}, "noise_std (--method#noise_std)"),  # a Mean Teacher argument at the top level
        ({"labeled_batch_size": 1}, "labeled_batch_size (no component reads it)"),  # a key of the old layout
        ({"method#efs_percentile": 80}, "takes no argument(s) ['efs_percentile']"),
    ],
)
def test_a_key_no_component_reads_is_an_error(override, message, tmp_path):
    workflow = make_workflow(["train.json", "methods/mean_teacher.json"], {"dataset_dir": str(tmp_path), **override})
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert message in failure_text(info.value)


def test_method_argument_override_reaches_the_method():
    overrides = {"method#consistency_on": "all", "method#student#base_width": 4}
    method = make_workflow(["train.json", "methods/mean_teacher.json"], overrides).parser.get_parsed_content("method")
    assert method.consistency_on == "all" and method.student.head.in_channels == 4


def test_check_config_keys_names_unread_keys_and_allows_entry_points():
    config = {"imports": [], "run": ["$@a"], "a": 1, "b": "@a", "stale": 2, "_desc_": "x"}
    with pytest.raises(ValueError, match=r"stale \(no component reads it\)"):
        check_config_keys(config)
    assert unread_keys({"run": "%training", "training": ["$@x#y"], "x": {"y": 1}}) == []


def test_ua_mt_parameters_include_those_passed_to_its_bases():
    parameters = method_parameters("bundle.methods.ua_mt.UncertaintyAwareMeanTeacherMethod")
    assert {"mc_samples", "rampup_iters", "noise_std", "ema_decay", "student", "max_iterations"} <= set(parameters)
    assert parameters["ema_decay"].default == 0.99 and parameters["mc_samples"].default == 8


def test_embedded_dataset_honours_num_labeled(tmp_path):
    """``--num_labeled 12`` on the embedded default: the generated dataset gets 12 labeled volumes (default 8)."""
    workflow = make_workflow(["train.json"], {"bundle_root": str(tmp_path), "num_labeled": 12})
    workflow.initialize()
    datalists = workflow.parser.get_parsed_content("datalists")
    assert len(datalists["labeled"]) == 12 and len(datalists["unlabeled"]) == 24 and len(datalists["validation"]) == 4
    spec = json.loads((tmp_path / "data" / "synthetic" / "dataset.json").read_text())
    assert sum("label" in item for item in spec["training"]) == 12


def test_protocol_method_args_are_a_known_key_applied_to_the_methods_that_take_them(monkeypatch):
    """``method_args`` of a benchmark protocol is read by ``benchmarking/runs.py``, not by a component: the check
    does not call it unread, and it becomes ``--method#<arg>`` only where the method takes the argument."""
    from benchmarking.runs import method_configs, protocol_overrides
    from bundle.config.unread_keys import PROTOCOL_KEYS

    protocol = json.loads((REPO_ROOT / "configs" / "benchmark" / "la_cpu.json").read_text())
    assert protocol["method_args"] == {"rampup_iters": 250} and "method_args" in PROTOCOL_KEYS
    monkeypatch.chdir(REPO_ROOT)
    config = ConfigParser.load_config_files(["configs/train.json", "configs/benchmark/la_cpu.json"])
    assert unread_keys(config) == []
    assert unread_keys({**config, "method_arg": 1}) == ["method_arg"]
    assert protocol_overrides(method_configs("mean_teacher", "cpu")) == {"method#rampup_iters": 250}
    assert protocol_overrides(method_configs("supervised_vnet", "cpu")) == {}
