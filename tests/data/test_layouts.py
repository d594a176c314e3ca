"""Dataset layouts: nnU-Net v2 raw (multi-channel, multi-class), names by case, and the default ``num_labeled``."""

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import Dataset
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd

from bundle.data.datalists import DatasetError, build_datalists, dataset_description
from bundle.data.synthetic import make_nnunet_dataset
from bundle.data.transforms import preprocessing
from bundle.inference.folder import FolderInference, image_datalist
from bundle.networks.subnets import SoftmaxEnsemble
from tests.conftest import REPO_ROOT, raises_bundle_error
from tests.training_helpers import make_workflow, run_workflow, tiny_overrides


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    return make_nnunet_dataset(
        str(tmp_path_factory.mktemp("nnunet") / "Dataset001_Synth"), shape=(24, 24, 8), test_labels=True
    )


def test_nnunet_v2_cases_stack_channels_and_use_imagesTs_as_unlabeled(nnunet_root):
    lists = build_datalists(nnunet_root, in_channels=2)  # num_labeled -1: every labeled case
    assert [item["case"] for item in lists["labeled"]] == [f"case_{i:03d}" for i in range(6)]
    first = lists["labeled"][0]
    assert first["image"] == [os.path.join(nnunet_root, "imagesTr", f"case_000_000{c}.nii.gz") for c in (0, 1)]
    assert first["label"] == os.path.join(nnunet_root, "labelsTr", "case_000.nii.gz")
    assert [item["case"] for item in lists["unlabeled"]] == ["case_006", "case_007", "case_008"]
    assert all("label" not in item for item in lists["unlabeled"]) and lists["validation"] == []
    loaded = preprocessing(keys=("image", "label"), num_classes=3)(first)
    expected = nib.load(first["image"][1]).get_fdata()
    assert loaded["image"].shape == (2, 24, 24, 8)
    assert torch.allclose(loaded["image"][1], torch.as_tensor((expected - expected.mean()) / expected.std()).float(),
                          atol=1e-4)  # fmt: skip
    assert sorted(torch.unique(loaded["label"]).tolist()) == [0.0, 1.0, 2.0]


def test_dataset_json_gives_channels_and_classes(nnunet_root, tmp_path):
    description = dataset_description(nnunet_root)
    assert description == {
        "in_channels": 2,
        "out_channels": 3,
        "channel_names": ["mod0", "mod1"],
        "labels": {"background": 0, "ellipsoid": 1, "sphere": 2},
    }
    msd = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "atrium"}, "training": []}
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    assert dataset_description(str(tmp_path))["labels"] == {"background": 0, "atrium": 1}
    assert dataset_description(str(tmp_path / "missing")) == {
        "in_channels": 1, "out_channels": 2, "channel_names": None, "labels": None}  # fmt: skip


def test_nnunet_problems_are_named(nnunet_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(nnunet_root, root)
    os.remove(root / "imagesTr" / "case_002_0001.nii.gz")
    shutil.copy(root / "labelsTr" / "case_000.nii.gz", root / "labelsTr" / "case_099.nii.gz")
    with pytest.raises(DatasetError) as info:
        build_datalists(str(root), in_channels=2)
    assert str(info.value) == (
        f"{root / 'imagesTr' / 'case_002_0000.nii.gz'}: case 'case_002' has channel(s) 0000; expected 0000, 0001 "
        "(in_channels=2)."
    )
    shutil.copy(nnunet_root + "/imagesTr/case_002_0001.nii.gz", root / "imagesTr")
    with pytest.raises(DatasetError, match="case_099.nii.gz: label has no image case"):
        build_datalists(str(root), in_channels=2)
    os.remove(root / "labelsTr" / "case_099.nii.gz")
    os.remove(root / "labelsTr" / "case_005.nii.gz")
    with pytest.raises(DatasetError, match="numTraining is 6 but .* has 5 label"):
        build_datalists(str(root), in_channels=2)
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(numTraining=5, labels={"background": 0, "tumour": [1, 2]})
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match="region-based labels are not supported"):
        dataset_description(str(root))


def test_a_small_dataset_uses_every_label_by_default(nnunet_root):
    """Six labeled cases train with the default num_labeled (-1); the benchmark's knob still selects K."""
    assert len(build_datalists(nnunet_root, in_channels=2)["labeled"]) == 6
    lists = build_datalists(nnunet_root, num_labeled=4, in_channels=2)
    assert len(lists["labeled"]) == 4 and [i["case"] for i in lists["unlabeled"]][:2] == ["case_004", "case_005"]
    assert all("label" not in item for item in lists["unlabeled"])


def test_inference_folder_names_outputs_by_case(nnunet_root, tmp_path):
    items = image_datalist(os.path.join(nnunet_root, "imagesTs"), in_channels=2)
    assert [item["case"] for item in items] == ["case_006", "case_007", "case_008"]
    single = tmp_path / "single"
    single.mkdir()
    for name in ("a_0000.nii.gz", "b_0000.nii.gz"):
        os.symlink(os.path.join(nnunet_root, "imagesTs", "case_006_0000.nii.gz"), single / name)
    assert [item["case"] for item in image_datalist(str(single))] == ["a", "b"]
    os.symlink(os.path.join(nnunet_root, "imagesTs", "case_006_0000.nii.gz"), single / "c.nii.gz")
    assert [item["case"] for item in image_datalist(str(single))] == ["a_0000", "b_0000", "c"]
    with pytest.raises(DatasetError, match="case_006_0000.nii.gz: name does not end in _XXXX|expected 0000"):
        image_datalist(str(single), in_channels=2)

    conv = torch.nn.Conv3d(2, 3, kernel_size=1)
    transform = preprocessing(keys=("image",))
    runner = FolderInference(
        dataset=Dataset(items[:1], transform=transform),
        network=SoftmaxEnsemble(conv, conv),
        inferer=SlidingWindowInferer(roi_size=(8, 8, 8)),
        postprocessing=Compose(
            [Invertd(keys="pred", orig_keys="image", transform=transform), AsDiscreted(keys="pred", argmax=True)]
        ),
        output_dir=str(tmp_path / "out"),
        in_channels=2,
    )
    runner.run()
    assert sorted(os.listdir(tmp_path / "out")) == ["case_006.nii.gz", "manifest.json"]
    source = nib.load(items[0]["image"][0])
    mask = nib.load(tmp_path / "out" / "case_006.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_nnunet_dataset_trains_segments_and_scores_by_case(nnunet_root, tmp_path):
    """The README's own-data commands on a 2-channel, 3-class, 0.7 x 0.7 x 5 mm nnU-Net dataset: training with
    only ``--dataset_dir`` (channels, classes, every labeled case and the median spacing come from the data; tiny
    sizes only to keep the test fast), inference of ``imagesTs/`` with no setting repeated (``CASE.nii.gz`` on each
    input's grid), and ``evaluate.json``'s ``score_masks`` pairing the masks with ``labelsTs/`` by case."""
    overrides = tiny_overrides(nnunet_root, tmp_path, max_iterations=2)
    del overrides["num_labeled"]
    workflow = run_workflow(make_workflow(["train.json"], overrides))
    parser = workflow.parser
    assert (parser.get_parsed_content("in_channels"), parser.get_parsed_content("out_channels")) == (2, 3)
    assert len(parser.get_parsed_content("datalists")["labeled"]) == 6
    assert parser.get_parsed_content("data_settings")["spacing"] == [0.7, 0.7, 5.0]
    assert parser.get_parsed_content("train#trainer").state.iteration == 2
    assert (tmp_path / "models" / "model.pt").is_file()

    masks = tmp_path / "masks"
    run_workflow(
        ConfigWorkflow(
            config_file=str(REPO_ROOT / "configs" / "inference.json"),
            logging_file=False,
            workflow_type="infer",
            ckpt_path=str(tmp_path / "models" / "model.pt"),
            dataset_dir=os.path.join(nnunet_root, "imagesTs"),
            output_dir=str(masks),
        )
    )
    cases = ["case_006", "case_007", "case_008"]
    assert sorted(os.listdir(masks)) == [f"{case}.nii.gz" for case in cases] + ["manifest.json"]
    for case in cases:
        mask, source = nib.load(masks / f"{case}.nii.gz"), nib.load(
            os.path.join(nnunet_root, "imagesTs", f"{case}_0000.nii.gz")
        )
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)

    def score_masks(output_dir):
        workflow = ConfigWorkflow(
            config_file=[str(REPO_ROOT / "configs" / name) for name in ("train.json", "evaluate.json")],
            logging_file=False,
            workflow_type=None,
            run_id="score_masks",
            pred_dir=str(masks),
            label_dir=os.path.join(nnunet_root, "labelsTs"),
            output_dir=str(output_dir),
            figure_slices=0,
        )
        workflow.initialize()
        workflow.run()

    score_masks(tmp_path / "eval")
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert [row["case"] for row in rows] == cases
    for row in rows:
        pred = np.asarray(nib.load(masks / f"{row['case']}.nii.gz").dataobj) > 0
        label = np.asarray(nib.load(os.path.join(nnunet_root, "labelsTs", f"{row['case']}.nii.gz")).dataobj) > 0
        dice = 2 * (pred & label).sum() / (pred.sum() + label.sum())
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-6)
    os.remove(masks / "case_007.nii.gz")
    with raises_bundle_error() as caught:
        score_masks(tmp_path / "eval2")
    assert str(caught[0]).splitlines()[1:] == [
        f"  {os.path.join(nnunet_root, 'labelsTs')}: 1 label(s) without a prediction in {masks}: case_007"
    ]
    assert not (tmp_path / "eval2").exists() or os.listdir(tmp_path / "eval2") == []


def test_brats_demo_layout_script_gives_an_nnunet_dataset(tmp_path):
    for index in range(4):
        case = tmp_path / "src" / f"Brats18_X_{index}"
        case.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.full((6, 6, 4), float(index), np.float32), np.eye(4)), case / "FLAIR.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), np.eye(4)), case / "GT_W.nii.gz")
    command = [
        sys.executable,
        "scripts/brats_demo_layout.py",
        str(tmp_path / "src"),
        str(tmp_path / "ds"),
        "--num_test",
        "1",
    ]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    lists = build_datalists(str(tmp_path / "ds"))
    assert [i["case"] for i in lists["labeled"]] == ["Brats18_X_0", "Brats18_X_1", "Brats18_X_2"]
    assert [i["case"] for i in lists["unlabeled"]] == ["Brats18_X_3"]
    assert dataset_description(str(tmp_path / "ds"))["labels"] == {"background": 0, "whole tumour": 1}
    failed = subprocess.run(command[:3] + [str(tmp_path / "ds2"), "--num_test", "4"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].endswith("4 case(s), num_test=4")
