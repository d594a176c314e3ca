"""Adding a method touches its module and its overlay only: a method written here, outside the package, trains through
``configs/train.json``, segments through ``configs/inference.json`` alone, and the presets (hence the benchmark report)
see it with its reference, with no edit to any other file."""

import json
import textwrap

import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from bundle.methods import presets
from tests.conftest import REPO_ROOT
from tests.training_helpers import run_workflow, tiny_overrides

METHOD_MODULE = '''
"""Entropy minimisation: supervised CE plus the entropy of the unlabeled softmax (a method written by a test)."""
import torch
from torch.nn import functional as F

from bundle.methods.base import SSLMethod
from bundle.networks.subnets import SoftmaxOutput


class EntropyMinimization(SSLMethod):
    term_names = ("sup", "ent")
    unlabeled_terms = ("ent",)

    def __init__(self, network, loss_weights, max_iterations):
        super().__init__(loss_weights, max_iterations)
        self.net = network
        self.set_inference_network(SoftmaxOutput(network))

    def terms(self, labeled_image, label, unlabeled_image, iteration, active):
        losses = {"sup": F.cross_entropy(self.net(labeled_image).float(), label[:, 0].long())}
        if "ent" in active:
            prob = torch.softmax(self.net(unlabeled_image).float(), dim=1)
            losses["ent"] = -(prob * torch.log(prob + 1e-6)).sum(dim=1).mean()
        return losses
'''

OVERLAY = {
    "_desc_": "Entropy minimisation on one V-Net (written by tests/methods/test_new_method.py).",
    "method": {
        "_target_": "entropy_minimization.EntropyMinimization",
        "network": {
            "_target_": "bundle.networks.subnets.VNetSeg",
            "in_channels": "@in_channels",
            "out_channels": "@out_channels",
            "base_width": "@base_width",
            "norm": ["group", {"num_groups": 2}],
            "dropout": 0.1,
        },
        "loss_weights": {"sup": 1.0, "ent": 0.5},
        "max_iterations": "@max_iterations",
    },
}


def test_a_method_written_outside_the_package_trains_segments_and_is_listed(tiny_dataset, tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "entropy_minimization.py").write_text(textwrap.dedent(METHOD_MODULE))
    monkeypatch.syspath_prepend(str(code))
    methods_dir = tmp_path / "methods"
    methods_dir.mkdir()
    for preset in presets.preset_names():
        (methods_dir / f"{preset}.json").write_text((REPO_ROOT / "configs" / "methods" / f"{preset}.json").read_text())
    overlay = methods_dir / "entropy_minimization.json"
    overlay.write_text(json.dumps(OVERLAY, indent=4))

    out = tmp_path / "run"
    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / "configs" / "train.json"), str(overlay)],
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **tiny_overrides(tiny_dataset, out),
    )
    run_workflow(workflow)
    output = workflow.parser.get_parsed_content("train#trainer").state.output
    assert set(output) >= {"loss_sup", "loss_ent"} and 0 < float(output["loss_ent"]) <= np.log(2) + 1e-6

    settings = json.loads((out / "models" / "model_metadata.json").read_text())
    assert settings["method"] == "entropy_minimization.EntropyMinimization"
    assert settings["network_def"]["net"] == {
        "_target_": "bundle.networks.subnets.VNetSeg",
        "in_channels": 1,
        "out_channels": 2,
        "base_width": 4,
        "norm": ["group", {"num_groups": 2}],
        "dropout": 0.1,
        "activation_checkpointing": False,
        "weight_init": "kaiming_normal",
    }

    inference = ConfigWorkflow(  # nothing repeated: the norm and width come from the model's settings
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        dataset_dir=f"{tiny_dataset}/imagesTr",
        output_dir=str(tmp_path / "pred"),
        ckpt_path=str(out / "models" / "model.pt"),
        sw_strides=[8, 8, 8],
    )
    inference.initialize()
    network = inference.parser.get_parsed_content("network_def")
    assert any(isinstance(module, torch.nn.GroupNorm) for module in network.modules())
    inference.run()
    masks = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert masks

    trained = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(network.state_dict()[k].cpu(), v) for k, v in trained.items())

    monkeypatch.setattr(presets, "PRESETS_DIR", methods_dir)
    assert "entropy_minimization" in presets.preset_names()
    assert presets.reference_of("entropy_minimization") == "supervised_vnet"
