"""The model's settings file: written by training, read by inference, and a contradicting setting refused."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle.data.synthetic import make_nnunet_dataset
from bundle.inference.evaluation import evaluate_folders
from bundle.inference.model_settings import SETTINGS_FILE, describe_model, read_model_settings
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.training_helpers import make_workflow, run_workflow, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on a 2-channel, 3-class, 0.7 x 0.7 x 5 mm nnU-Net dataset with only its dataset_dir
    (and sizes that keep the test fast)."""
    root = tmp_path_factory.mktemp("model")
    dataset = make_nnunet_dataset(str(root / "Dataset003_Settings"), shape=(24, 24, 8))
    overrides = tiny_overrides(dataset, root / "train", max_iterations=2)
    del overrides["num_labeled"]
    run_workflow(make_workflow(["train.json"], overrides))
    return dataset, root / "train" / "models"


def _inference(ckpt_path, dataset_dir, output_dir, **override):
    return ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        ckpt_path=str(ckpt_path),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **override,
    )


def test_training_writes_the_settings_next_to_the_weights(trained):
    _, models = trained
    assert sorted(os.listdir(models)) == ["model.pt", SETTINGS_FILE]
    settings = json.loads((models / SETTINGS_FILE).read_text())
    expected = {
        "in_channels": 2,
        "out_channels": 3,
        "base_width": 4,
        "network": "SoftmaxEnsemble",
        "channel_names": ["mod0", "mod1"],
        "labels": {"background": 0, "ellipsoid": 1, "sphere": 2},
        "orientation": "RAS",
        "spacing": [0.7, 0.7, 5.0],
        "resample_factor": 1.0,
        "intensity": {"scheme": "zscore"},
        "patch_size": [16, 16, 16],
        "sw_strides": [16, 16, 16],
        "method": "bundle.methods.dual_network.DualNetworkMethod",
    }
    assert {key: settings[key] for key in expected} == expected
    outputs = settings["network_data_format"]["outputs"]["pred"]
    assert outputs["channel_def"] == {"0": "background probability", "1": "ellipsoid probability",
                                      "2": "sphere probability"}  # fmt: skip
    assert settings["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "mod0", "1": "mod1"}


def test_inference_reads_the_settings_and_names_masks_by_case(trained, tmp_path):
    """imagesTs segmented with no setting repeated: CASE.nii.gz with each input's shape and affine; the same on
    imagesTr pairs with labelsTr by case in the evaluation."""
    dataset, models = trained
    workflow = _inference(models / "model.pt", os.path.join(dataset, "imagesTs"), tmp_path / "masks")
    workflow.initialize()
    workflow.run()
    assert sorted(os.listdir(tmp_path / "masks")) == [
        "case_006.nii.gz",
        "case_007.nii.gz",
        "case_008.nii.gz",
        "manifest.json",
    ]
    for case in ("case_006", "case_007", "case_008"):
        mask = nib.load(tmp_path / "masks" / f"{case}.nii.gz")
        source = nib.load(os.path.join(dataset, "imagesTs", f"{case}_0000.nii.gz"))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert workflow.parser.get_parsed_content("patch_size") == [16, 16, 16]

    workflow = _inference(models / "model.pt", os.path.join(dataset, "imagesTr"), tmp_path / "train_masks")
    workflow.initialize()
    workflow.run()
    summary = evaluate_folders(str(tmp_path / "train_masks"), os.path.join(dataset, "labelsTr"), str(tmp_path / "ev"))
    assert summary["num_cases"] == 6


@pytest.mark.parametrize(
    "override, line",
    [
        ({"patch_size": [48, 48, 48]}, "patch_size: the model has [16, 16, 16], given [48, 48, 48]"),
        ({"spacing": [1.0, 1.0, 1.0]}, "spacing: the model has [0.7, 0.7, 5.0], given [1.0, 1.0, 1.0]"),
        ({"intensity": "ct"}, 'intensity: the model has "zscore", given "ct"'),
    ],
)
def test_a_contradicting_setting_stops_before_anything_is_written(trained, tmp_path, override, line):
    dataset, models = trained
    workflow = _inference(models / "model.pt", os.path.join(dataset, "imagesTs"), tmp_path / "masks", **override)
    with raises_bundle_error() as error:
        workflow.initialize()
        workflow.run()
    assert str(error[0]).splitlines() == [
        f"Cannot segment: settings contradict the model's {models / SETTINGS_FILE}:",
        f"  {line}",
    ]
    assert not (tmp_path / "masks").exists()


def test_models_without_a_settings_file_keep_the_former_defaults(tmp_path):
    settings = read_model_settings(str(tmp_path / "model.pt"))
    assert settings["source"] is None and settings["patch_size"] == [32, 32, 32] and settings["spacing"] is None
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with raises_bundle_error(match=f"{tmp_path / SETTINGS_FILE}: not readable JSON"):
        read_model_settings(str(tmp_path / "model.pt"))


def test_the_default_model_describes_itself_as_metadata_json_does():
    """The embedded default data names no labels: the model's channel definitions are those of metadata.json."""
    from bundle.networks.subnets import SoftmaxEnsemble

    data = {"spacing": [1.0, 1.0, 1.5], "intensity": {"scheme": "zscore"}}
    network = SoftmaxEnsemble(torch.nn.Identity(), torch.nn.Identity())
    settings = describe_model(network, "m", 1, 2, 16, [32] * 3, [16] * 3, 1.0, data)
    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())["network_data_format"]
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        ours = settings["network_data_format"][side][key]
        assert ours["channel_def"] == metadata[side][key]["channel_def"]
        assert ours["num_channels"] == metadata[side][key]["num_channels"]
    assert settings["labels"] == {"background": 0, "foreground": 1}
