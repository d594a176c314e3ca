"""Nothing a user gave is overwritten, and every flag means what it says (issue 27).

One test (or group) per finding: input folders protected under several spellings; one boolean parser for every
boolean key of every config and script; a manifest per inference run and no stale outputs; literal folder names
with glob characters; one-line errors for a malformed dataset.json and for labels outside the classes with the
voxel check off; unpaired evaluation is an error; a failed training leaves no folder it created.
"""

import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle.config.booleans import (
    BooleanSettingError,
    boolean_command,
    config_boolean_paths,
    normalize_config_booleans,
    parse_bool,
)
from bundle.config.paths import CreatedFolderGuard, PathError, check_outputs_apart, keep_created_folders
from bundle.config.unread_keys import method_parameters
from bundle.data.checks import batch_label_problems
from bundle.data.datalists import DatasetError, build_datalists
from bundle.data.synthetic import ensure_synthetic_dataset
from bundle.inference.evaluation import UnpairedCasesError, evaluate_folders
from bundle.inference.folder import image_datalist
from bundle.inference.manifest import FORMAT, MANIFEST_NAME
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.inference_helpers import inference_workflow, pointwise_ensemble, synthetic_image, write_nifti

CONFIG_DIR = REPO_ROOT / "configs"


def _digest(folder):
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def _scans(folder, names=("a", "b")):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        image = synthetic_image()
        image[0, 0, 0] += index  # distinct files
        write_nifti(folder / f"{name}.nii.gz", image)
    return folder


def _run(dataset_dir, output_dir, **override):
    workflow = inference_workflow(dataset_dir, output_dir, **override)
    workflow.initialize()
    return workflow.run()


# ------------------------------------------------------------------------------- 1. input folders protected
def _spellings(tmp_path):
    """(dataset_dir, output_dir, folder named in the message) per spelling of "the output folder holds the inputs"."""
    scans = tmp_path / "scans"
    (tmp_path / "link").symlink_to(scans, target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    linked_files = _scans(tmp_path / "real_out")  # inputs are symlinks to files inside the output folder
    (tmp_path / "links").mkdir()
    for name in ("a", "b"):
        (tmp_path / "links" / f"{name}.nii.gz").symlink_to(linked_files / f"{name}.nii.gz")
    _scans(tmp_path / "pattern" / "site1")
    return {
        "same path": (scans, scans),
        "relative": (scans, Path("scans")),
        "trailing slash and ..": (scans, f"{tmp_path / 'elsewhere'}/../scans/"),
        "symlinked folder": (scans, tmp_path / "link"),
        "input is a sub-folder of the output": (scans / "probabilities", scans),
        "pattern matching the outputs": (f"{tmp_path}/pattern/*/*.nii.gz", tmp_path / "pattern" / "masks"),
        "inputs are symlinks into the output folder": (tmp_path / "links", tmp_path / "real_out"),
    }


@pytest.mark.parametrize(
    "spelling",
    [
        "same path",
        "relative",
        "trailing slash and ..",
        "symlinked folder",
        "input is a sub-folder of the output",
        "pattern matching the outputs",
        "inputs are symlinks into the output folder",
    ],
)
def test_inference_refuses_an_output_folder_holding_its_inputs(tmp_path, monkeypatch, spelling):
    _scans(tmp_path / "scans")
    _scans(tmp_path / "scans" / "probabilities", names=("c",))
    dataset_dir, output_dir = _spellings(tmp_path)[spelling]
    monkeypatch.chdir(tmp_path)
    before = _digest(tmp_path)
    with raises_bundle_error() as caught:
        _run(dataset_dir, output_dir, ckpt_path=str(tmp_path / "no_model.pt"))  # stops before the weights are read
    lines = str(caught[0]).splitlines()
    assert lines[0] == "Cannot segment:" and len(lines) == 2
    assert "nothing was read or written" in lines[1]
    assert lines[1].startswith(f"  {output_dir}")
    assert "(both are " in lines[1] or "match the input pattern" in lines[1]
    assert _digest(tmp_path) == before  # nothing written, nothing removed


def test_outputs_next_to_the_inputs_are_allowed(tmp_path):
    """An output folder inside the input folder is not read back (folders are listed non-recursively)."""
    scans = _scans(tmp_path / "scans")
    check_outputs_apart([str(scans / "a.nii.gz")], str(scans / "masks"), ["probabilities"])
    with pytest.raises(PathError, match="is the folder holding the inputs"):
        check_outputs_apart([str(scans / "a.nii.gz")], str(scans / "masks" / ".."), [])


def test_rank_and_evaluate_refuse_an_input_folder_as_output(tmp_path):
    scans = _scans(tmp_path / "scans")
    (tmp_path / "labels").mkdir()
    (tmp_path / "figures").mkdir()
    before = _digest(tmp_path)
    workflow = ConfigWorkflow(
        config_file=[str(CONFIG_DIR / "inference.json"), str(CONFIG_DIR / "rank.json")],
        logging_file=False,
        workflow_type="infer",
        dataset_dir=str(scans),
        output_dir=str(scans),
        ckpt_path=None,
        network_def=pointwise_ensemble(),
        patch_size=[8, 8, 8],
        sw_strides=[4, 4, 4],
    )
    workflow.initialize()
    with raises_bundle_error(match="is the folder holding the inputs"):
        workflow.run()
    for output in (scans, tmp_path / "labels", tmp_path):  # the prediction folder, the label folder, figures/
        with pytest.raises(PathError, match="is the folder holding the inputs"):
            evaluate_folders(str(scans), str(tmp_path / "labels"), str(output), image_dir=str(tmp_path / "figures"))
    assert _digest(tmp_path) == before


# ------------------------------------------------------------------------------------------- 2. booleans
SPELLED = {
    True: [True, 1, "true", "True", "1", "yes"],
    False: [False, 0, "false", "False", "0", "no"],
}


@pytest.mark.parametrize("bad", ["maybe", "TRUE", "on", 2, None, 0.5])
def test_parse_bool_rejects_other_values_naming_the_key(bad):
    with pytest.raises(BooleanSettingError) as info:
        parse_bool(bad, "save_probabilities")
    assert str(info.value) == (
        f"save_probabilities: expected a boolean (true/false, True/False, 1/0 or yes/no), got {bad!r}"
    )


def _config_files():
    return sorted(p for p in CONFIG_DIR.rglob("*.json") if p.name not in ("metadata.json",))


def test_every_boolean_key_of_every_config_is_parsed():
    """Walk every boolean key of every config file: each spelling parses to its value, anything else names the key."""
    checked = 0
    for file in _config_files():
        raw = json.loads(file.read_text())
        for path in config_boolean_paths():
            config = json.loads(json.dumps(raw))
            node, found = config, True
            for part in path.split("#") if path not in config else [path]:
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    found = False
                    break
            if not found or not isinstance(node, bool):
                continue
            for expected, spellings in SPELLED.items():
                for value in spellings:
                    config = json.loads(json.dumps(raw))
                    _set_path(config, path, value)
                    normalize_config_booleans(config)
                    assert _get_path(config, path) is expected, (file.name, path, value)
            config = json.loads(json.dumps(raw))
            _set_path(config, path, "maybe")
            with pytest.raises(BooleanSettingError, match=f"^{path}: expected a boolean"):
                normalize_config_booleans(config)
            checked += 1
    assert checked >= 40


def _get_path(config, path):
    if path in config:
        return config[path]
    node = config
    for part in path.split("#"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_path(config, path, value):
    if path in config:
        config[path] = value
        return
    *parents, last = path.split("#")
    node = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value


def test_every_boolean_method_argument_is_parsed():
    """Method arguments with a boolean default (stated in a preset or not) go through the same parser."""
    checked = 0
    for file in sorted((CONFIG_DIR / "methods").glob("*.json")):
        method = json.loads(file.read_text()).get("method")
        if not isinstance(method, dict):
            continue
        flags = [n for n, p in method_parameters(method["_target_"]).items() if isinstance(p.default, bool)]
        for name in flags:
            config = {"method": {**method, name: "no"}}
            normalize_config_booleans(config)
            assert config["method"][name] is False, (file.name, name)
            config = {"method": {**method, name: "maybe"}}
            with pytest.raises(BooleanSettingError, match=f"method#{name}: expected a boolean"):
                normalize_config_booleans(config)
            checked += 1
    assert checked >= 5


def test_expressions_and_references_are_left_to_monai():
    config = {"save_probabilities": "$True", "save_uncertainty": "@x", "check_data": True}
    assert normalize_config_booleans(config) == {}
    assert config == {"save_probabilities": "$True", "save_uncertainty": "@x", "check_data": True}


@pytest.mark.parametrize("spelling", ["false", "no", "0"])
def test_save_probabilities_false_as_typed_writes_no_maps(tmp_path, spelling):
    """``--save_probabilities false --save_uncertainty false`` arrive as strings; they must mean false."""
    scans = _scans(tmp_path / "scans", names=("a",))
    _run(scans, tmp_path / "out", save_probabilities=spelling, save_uncertainty=spelling)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.nii.gz", MANIFEST_NAME]
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["settings"]["save_probabilities"] is False and manifest["settings"]["save_uncertainty"] is False


def test_a_bad_boolean_stops_inference_naming_the_key(tmp_path):
    scans = _scans(tmp_path / "scans", names=("a",))
    with raises_bundle_error() as caught:
        _run(scans, tmp_path / "out", save_probabilities="maybe")
    assert str(caught[0]).splitlines() == [
        "Invalid settings (config or command-line overrides):",
        "  save_probabilities: expected a boolean (true/false, True/False, 1/0 or yes/no), got 'maybe'",
    ]
    assert not (tmp_path / "out").exists()


def test_script_flags_use_the_same_parser():
    seen = []

    def main(path: str, allow_unpaired: bool = False, count: int = 1):
        seen.append((allow_unpaired, count))

    command = boolean_command(main)
    for value, expected in (("false", False), ("yes", True), (0, False), (True, True)):
        command("x", allow_unpaired=value)
        assert seen[-1] == (expected, 1)
    with pytest.raises(SystemExit, match="--allow_unpaired: expected a boolean"):
        command("x", allow_unpaired="sure")


# ------------------------------------------------------------------------------- 3. manifest, stale outputs
def test_manifest_and_no_outputs_of_an_earlier_run_left(tmp_path):
    scans = _scans(tmp_path / "scans", names=("a", "b"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _run(scans, out, save_probabilities=True, save_uncertainty=True)
    first = json.loads((out / MANIFEST_NAME).read_text())
    assert first["format"] == FORMAT and first["status"] == "complete"
    assert first["inputs"] == [str(scans / "a.nii.gz"), str(scans / "b.nii.gz")]
    assert sorted(first["outputs"]) == sorted(
        f"{folder}{name}.nii.gz" for folder in ("", "probabilities/", "entropy/", "disagreement/") for name in "ab"
    )
    assert first["settings"]["save_probabilities"] is True and first["settings"]["patch_size"] == [8, 8, 8]
    assert first["model"] is None and first["other_files"] == ["notes.txt"] and first["started"] <= first["finished"]

    os.remove(scans / "b.nii.gz")  # the second run has one input less and no maps
    _run(scans, out, save_probabilities="false")
    assert sorted(os.listdir(out)) == ["a.nii.gz", MANIFEST_NAME, "notes.txt"]  # the user's file is kept
    second = json.loads((out / MANIFEST_NAME).read_text())
    assert second["outputs"] == ["a.nii.gz"] and second["inputs"] == [str(scans / "a.nii.gz")]
    assert second["other_files"] == ["notes.txt"]


def test_manifest_records_the_model_and_a_foreign_manifest_stops_the_run(tmp_path):
    scans = _scans(tmp_path / "scans", names=("a",))
    model = tmp_path / "model.pt"
    torch.save(pointwise_ensemble().state_dict(), model)
    _run(scans, tmp_path / "out", ckpt_path=str(model), network_def=pointwise_ensemble())
    record = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["model"]
    assert record == {
        "path": str(model),
        "bytes": model.stat().st_size,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
    }
    (tmp_path / "out" / MANIFEST_NAME).write_text('{"outputs": ["../scans/a.nii.gz"]}')
    with raises_bundle_error() as caught:
        _run(scans, tmp_path / "out")
    assert (
        str(caught[0])
        .splitlines()[1]
        .startswith(f"  {tmp_path / 'out' / MANIFEST_NAME}: not a manifest written by this bundle's inference")
    )
    assert (scans / "a.nii.gz").exists()


def test_listed_paths_outside_the_output_folder_are_never_removed(tmp_path):
    scans = _scans(tmp_path / "scans", names=("a",))
    out = tmp_path / "out"
    _run(scans, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["outputs"] += ["../scans/a.nii.gz", str(scans / "a.nii.gz"), "."]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    before = _digest(scans)
    _run(scans, out)
    assert _digest(scans) == before


# ----------------------------------------------------------------------------------- 4. literal folder names
def test_folder_name_with_glob_characters(tmp_path):
    scans = _scans(tmp_path / "scans [v2]", names=("a",))
    (tmp_path / "scans v").mkdir()  # what "[v2]" would match as a pattern
    assert image_datalist(str(scans)) == [{"image": str(scans / "a.nii.gz"), "case": "a"}]
    assert image_datalist(f"{scans}/*.nii.gz") == [{"image": str(scans / "a.nii.gz"), "case": "a"}]
    _run(scans, tmp_path / "masks [v2]")
    assert (tmp_path / "masks [v2]" / "a.nii.gz").is_file()


# ----------------------------------------------------------------------------------------- 5. named errors
def test_malformed_dataset_json_is_one_line_with_line_and_column(tmp_path):
    (tmp_path / "dataset.json").write_text('{\n    "training": [\n        {"image": "a.nii.gz",}\n    ]\n}\n')
    with pytest.raises(DatasetError) as info:
        build_datalists(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path / 'dataset.json'}: not valid JSON: Expecting property name enclosed in double quotes at line 3, "
        "column 30."
    )
    (tmp_path / "dataset.json").write_text('{"training": [{"label": "a.nii.gz"}]}')
    with pytest.raises(DatasetError, match=r"dataset.json: 'training' entry 0 must be a path or \{"):
        build_datalists(str(tmp_path))
    result = subprocess.run(
        [sys.executable, "scripts/check_data.py", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"  {tmp_path / 'dataset.json'}: 'training' entry 0")


def test_batch_labels_outside_the_classes_name_the_file():
    from monai.data import MetaTensor

    label = torch.zeros(2, 1, 4, 4, 4)
    label[1, 0, 0, 0, 0] = 255
    label = MetaTensor(label, meta={"filename_or_obj": ["/d/a.nii.gz", "/d/b.nii.gz"]})
    assert batch_label_problems(label, 2) == [
        "/d/b.nii.gz: label values [255.0] outside [0, 2) (out_channels=2) in a training patch"
    ]
    assert batch_label_problems(label, 256) == []


# ----------------------------------------------------------------------------------------- 6. unpaired cases
def test_evaluate_command_stops_on_unpaired_cases_unless_allowed(tmp_path, monkeypatch, capsys):
    for folder, names in (("pred", ("a",)), ("label", ("a", "b", "c"))):
        (tmp_path / folder).mkdir()
        for name in names:
            write_nifti(tmp_path / folder / f"{name}.nii.gz", np.zeros((6, 6, 6), np.uint8), np.eye(4))
    script = str(REPO_ROOT / "scripts" / "evaluate.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "pred", "label", "--output_dir", "eval"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    assert str(info.value.code).splitlines() == [
        "Cannot evaluate: some files have no partner (--allow_unpaired true scores the paired cases only):",
        "  label: 2 label(s) without a prediction in pred: b, c",
    ]
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UnpairedCasesError):
        evaluate_folders("pred", "label", "eval")
    monkeypatch.setattr(sys, "argv", [script, "pred", "label", "--output_dir", "eval", "--allow_unpaired", "true"])
    runpy.run_path(script, run_name="__main__")
    assert "1 cases" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["unpaired_labels"] == ["b", "c"]


# --------------------------------------------------------------------------- 7. failed training leaves nothing
def test_folder_guard_removes_only_new_folders(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old").mkdir()
    guard = CreatedFolderGuard([str(tmp_path / "runs"), str(tmp_path / "a" / "b" / "models")])
    (tmp_path / "runs" / "tensorboard").mkdir()
    (tmp_path / "runs" / "tensorboard" / "events").write_text("x")
    (tmp_path / "a" / "b" / "models").mkdir(parents=True)
    assert sorted(guard.remove_new_folders()) == [str(tmp_path / "a"), str(tmp_path / "runs" / "tensorboard")]
    assert sorted(os.listdir(tmp_path)) == ["runs"] and os.listdir(tmp_path / "runs") == ["old"]
    kept = CreatedFolderGuard([str(tmp_path / "new")])
    (tmp_path / "new").mkdir()
    keep_created_folders()
    assert kept.remove_new_folders() == [] and (tmp_path / "new").is_dir()


def test_label_255_with_check_data_false_stops_naming_the_file_and_leaves_no_folder(tmp_path):
    """As typed on the command line: ``--check_data false`` (a string) really switches the voxel check off; the
    label value 255 is then caught where the loss would fail, naming the file, and the run leaves no folder."""
    data = Path(ensure_synthetic_dataset(str(tmp_path / "data"), 2, 2, 0, shape=(16, 16, 16)))
    label_path = sorted((data / "labelsTr").iterdir())[0]
    label = nib.load(str(label_path))
    values = np.asarray(label.dataobj).copy()
    values[values > 0] = 255
    nib.save(nib.Nifti1Image(values, label.affine, label.header), str(label_path))
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/methods/supervised.json']",
        "--dataset_dir", str(data), "--output_dir", str(tmp_path / "runs" / "train"),
        "--model_dir", str(tmp_path / "models"), "--check_data", "false", "--num_labeled", "2",
        "--patch_size", "[16,16,16]", "--base_width", "4", "--max_iterations", "2",
        "--train#trainer#precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1
    assert "IndexError" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"  {label_path}: label values [255.0] outside [0, 2) (out_channels=2) in a training patch"
    )
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no runs/, no models/


def test_unreadable_prediction_is_one_line_naming_it(tmp_path):
    write_nifti(tmp_path / "label.nii.gz", np.zeros((6, 6, 6), np.uint8), np.eye(4))
    (tmp_path / "pred").mkdir()
    (tmp_path / "labels").mkdir()
    os.replace(tmp_path / "label.nii.gz", tmp_path / "labels" / "a.nii.gz")
    (tmp_path / "pred" / "a.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError) as info:
        evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "labels"), str(tmp_path / "eval"))
    assert str(info.value).startswith(f"{tmp_path / 'pred' / 'a.nii.gz'}: not a readable label map (")
    assert "\n" not in str(info.value)


def test_evaluate_config_check_refuses_input_folders(tmp_path):
    """``configs/evaluate.json``'s ``outputs_check``: output_dir, figures/ and predictions_dir against the validation
    files."""
    from bundle.config.paths import outputs_apart_or_exit

    evaluate = json.loads((CONFIG_DIR / "evaluate.json").read_text())
    assert evaluate["run"][:2] == ["$@weights_check", "$@outputs_check"]
    item = {"image": str(tmp_path / "imagesTr" / "c.nii.gz"), "label": str(tmp_path / "labelsTr" / "c.nii.gz")}
    kwargs = dict(title="Cannot evaluate:", inputs=list(item.values()))
    outputs_apart_or_exit(output_dir=str(tmp_path / "eval"), subfolders=["figures"], **kwargs)
    for output_dir, subfolders in (
        (tmp_path / "labelsTr", ["figures"]),
        (tmp_path / "eval", ["figures", str(tmp_path / "imagesTr")]),
    ):
        with raises_bundle_error(match="is the folder holding the inputs") as caught:
            outputs_apart_or_exit(output_dir=str(output_dir), subfolders=subfolders, **kwargs)
        assert str(caught[0]).splitlines()[0] == "Cannot evaluate:"
