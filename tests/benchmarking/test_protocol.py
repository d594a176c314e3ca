"""The LA ``cpu`` protocol and the recipes it compares: the ``supervised_vnet`` reference, ramps in absolute
iterations, the single-V-Net methods' RotFlip augmentation, BCP's joint forward and pre-training length."""

import math

import numpy as np
import pytest
import torch

from benchmarking.runs import protocol_overrides, resolved_hyperparameters
from bundle.data.transforms import training_transforms
from bundle.losses.baselines import HalfCEDiceLoss
from bundle.methods.supervised_vnet import SupervisedVNetMethod
from tests.conftest import REPO_ROOT
from tests.training_helpers import make_workflow, run_workflow, tiny_conv_net, tiny_overrides

SINGLE_VNET_METHODS = ("mean_teacher", "ua_mt", "cps", "bcp", "supervised_vnet")


def protocol_parser(method, **overrides):
    """The configs of a ``cpu`` benchmark run of ``method``, with the protocol's method arguments applied as
    ``scripts/benchmark.py`` applies them."""
    configs = ["train.json", "datasets/la.json", f"methods/{method}.json", "benchmark/la_cpu.json"]
    method_args = protocol_overrides([str(REPO_ROOT / "configs" / c) for c in configs])
    return make_workflow(configs, {"dataset_dir": ".", **method_args, **overrides}).parser


def test_supervised_vnet_is_half_ce_plus_dice_of_one_net_on_the_labeled_batch():
    net = tiny_conv_net(3)
    method = SupervisedVNetMethod(net, {"sup": 1.0}, max_iterations=10)
    image = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    label = (image > 0.3).long()
    terms = method(image, label, None, 0)
    assert list(terms) == ["sup"] and not method.uses_unlabeled
    logits = net(image)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    p = torch.softmax(logits, 1)[:, 1]
    y = label[:, 0].float()
    dice = 1 - (2 * (p * y).sum() + 1e-5) / ((p * p).sum() + (y * y).sum() + 1e-5)
    assert float(terms["sup"].detach()) == pytest.approx(float((0.5 * (ce + dice)).detach()), rel=1e-5)
    assert float(terms["sup"].detach()) == pytest.approx(
        float(HalfCEDiceLoss("fg_sq")(logits, label).detach()), rel=1e-6
    )
    terms["sup"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert set(method.inference_network().state_dict()) == {f"net.{k}" for k in net.state_dict()}


def test_supervised_vnet_preset_trains_through_the_bundle_and_loads_for_inference(tmp_path):
    from bundle.data.synthetic import ensure_synthetic_dataset

    data = ensure_synthetic_dataset(str(tmp_path / "d"), num_labeled=4, num_unlabeled=2, num_validation=1,
                                    shape=(20, 20, 18))  # fmt: skip
    workflow = run_workflow(make_workflow(["train.json", "methods/supervised_vnet.json"],
                                          tiny_overrides(data, tmp_path / "out")))  # fmt: skip
    method = workflow.parser.get_parsed_content("network")
    assert type(method).__name__ == "SupervisedVNetMethod"
    assert workflow.parser.get_parsed_content("train#trainer").unlabeled_data_loader is None
    inference = make_workflow(["inference.json", "inference_single_net.json"], {"base_width": 4}).parser
    network = inference.get_parsed_content("network_def")
    network.load_state_dict(torch.load(tmp_path / "out" / "models" / "model.pt"))


@pytest.mark.parametrize(
    "iteration, ramp", [(0, math.exp(-5)), (125, math.exp(-5 * 0.25)), (249, math.exp(-5 * (1 / 250) ** 2)),
                        (250, 1.0), (999, 1.0)]  # fmt: skip
)
def test_protocol_ramps_every_unlabeled_term_over_250_absolute_iterations(iteration, ramp):
    dual = protocol_parser("dual_journal").get_parsed_content("method")
    weights = dual.term_weights(iteration)
    for name in ("cps", "efs", "ue", "cos"):
        assert weights[name] == pytest.approx(ramp, rel=1e-12)
    assert weights["sup"] == 1.0 and weights["cr"] == 0.5
    # the PGL ramp keeps its own lambda_c over the whole run (0.1 at the end)
    assert weights["pgl"] == pytest.approx(0.1 * math.exp(-5 * (1 - iteration / 1000) ** 2), rel=1e-12)
    # Mean Teacher: 0.1 r(6 floor(t / 6), 250), the released staircase scaled to the protocol
    mean_teacher = protocol_parser("mean_teacher").get_parsed_content("method")
    step_ramp = math.exp(-5 * (1 - min(6 * (iteration // 6), 250) / 250) ** 2)
    assert mean_teacher.term_weights(iteration)["cons"] == pytest.approx(0.1 * step_ramp, rel=1e-12)


def test_protocol_learning_rate_is_high_while_the_ramps_finish():
    parser = protocol_parser("mean_teacher")
    assert parser["method#rampup_iters"] == 250 < parser["lr_scheduler#milestones"][0] == 650
    assert parser["max_iterations"] == 1000 and parser["train#trainer#precision"] == "bf16"
    # methods without a ramp do not get the argument (as before methods held their own arguments)
    for method in ("bcp", "ducisc", "dycon", "supervised_vnet"):
        assert "rampup_iters" not in protocol_parser(method)["method"], method
    # the paper presets keep the dual method unramped outside the protocol
    plain = make_workflow(["train.json", "methods/dual_journal.json"], {}).parser.get_parsed_content("method")
    assert plain.term_weights(0)["cps"] == 1.0


def test_single_vnet_methods_share_the_supervised_loss_and_the_augmentation():
    for method in SINGLE_VNET_METHODS:
        parser = protocol_parser(method)
        assert parser["train#preprocessing#augment"] is True, method
        if method != "bcp":  # BCP's own paper defines its loss (Dice with a linear denominator, every class)
            assert parser.get_parsed_content("method").supervised.dice_variant == "fg_sq", method
    for method in ("dual_journal", "dual_isbi", "supervised"):
        assert protocol_parser(method)["train#preprocessing#augment"] is False


def test_bcp_forwards_jointly_and_pretrains_a_third_of_the_run():
    method = protocol_parser("bcp").get_parsed_content("method")
    assert method.joint_forward is True
    assert method.pretrain_iterations == 333 and method.stage_starts == (333,)


def test_records_keep_resolved_values_of_the_method_only():
    config = resolved_hyperparameters(protocol_parser("mean_teacher", **{"method#student#base_width": 4}))
    method = config["method"]
    assert method["_target_"] == "bundle.methods.mean_teacher.MeanTeacherMethod"
    assert (method["rampup_iters"], method["rampup_step"], method["ema_decay"], method["noise_std"]) == (
        250,
        6,
        0.99,
        0.1,
    )
    assert method["loss_weights"] == {"sup": 1.0, "cons": 0.1} and method["max_iterations"] == 1000
    assert "student" not in method and not {"efs_percentile", "cr_threshold", "rampup_iters"} & set(config)
    assert config["train#trainer#precision"] == "bf16" and config["lr_scheduler#milestones"] == [650, 900]
    assert all(not (isinstance(v, str) and v[:1] in "@$") for v in [*config.values(), *method.values()])


def _volume(shape=(6, 6, 4)):
    image = torch.arange(float(np.prod(shape))).reshape(1, *shape)
    return {"image": image, "label": image.remainder(3)}


def test_augmentation_is_a_rotation_then_exactly_one_flip_on_image_and_label_alike():
    vol = _volume()
    base = vol["image"][0]
    rotations = [torch.rot90(base, k, (0, 1)) for k in range(4)]
    reflections = {(k, axis): torch.flip(r, (axis,)) for k, r in enumerate(rotations) for axis in (0, 1)}
    transform = training_transforms(["image", "label"], [6, 6, 4], augment=True)
    transform.transforms = transform.transforms[3:]  # skip loading/orientation: feed tensors directly
    transform.transforms = [t for t in transform.transforms if type(t).__name__ != "NormalizeIntensityd"]
    seen = set()
    for seed in range(60):
        transform.set_random_state(seed)
        out = transform({"image": vol["image"].clone(), "label": vol["label"].clone()})
        image = torch.as_tensor(out["image"])[0]
        assert not any(torch.equal(image, r) for r in rotations), "no flip (or two flips) applied"
        match = [key for key, r in reflections.items() if torch.equal(image, r)]
        assert match, "not a rot90 + single flip of the input"
        seen.add(match[0])
        assert torch.equal(torch.as_tensor(out["label"])[0], image.remainder(3))  # same transform on the label
    # flip0 after rot k equals flip1 after rot k+2: four distinct reflections, all reached
    assert len({tuple(reflections[key].flatten().tolist()) for key in seen}) == 4


def test_augmentation_keeps_a_non_square_patch_shape():
    transform = training_transforms(["image", "label"], [4, 2, 2], augment=True)
    transform.transforms = [t for t in transform.transforms[3:] if type(t).__name__ != "NormalizeIntensityd"]
    for seed in range(8):
        transform.set_random_state(seed)
        out = transform(_volume((6, 3, 4)))
        assert tuple(out["image"].shape) == (1, 4, 2, 2) and tuple(out["label"].shape) == (1, 4, 2, 2)


def test_the_long_cpu_protocol_is_the_cpu_protocol_three_times_as_long():
    import json

    base, long = (
        json.loads((REPO_ROOT / "configs" / "benchmark" / f"la_{p}.json").read_text()) for p in ("cpu", "cpu_long")
    )
    scaled = {"_desc_", "max_iterations", "lr_scheduler#milestones", "method_args", "val_interval"}
    assert set(base) == set(long) and {k: long[k] for k in base if k not in scaled} == {
        k: base[k] for k in base if k not in scaled
    }
    assert long["max_iterations"] == 3 * base["max_iterations"] == 3000
    assert long["lr_scheduler#milestones"] == [3 * m for m in base["lr_scheduler#milestones"]]
    assert long["method_args"] == {"rampup_iters": 3 * base["method_args"]["rampup_iters"]}
    configs = ["train.json", "datasets/la.json", "methods/{}.json", "benchmark/la_cpu_long.json"]
    for method, attribute, value in (("mean_teacher", "rampup_iters", 750), ("bcp", "pretrain_iterations", 1000)):
        files = [c.format(method) for c in configs]
        method_args = protocol_overrides([str(REPO_ROOT / "configs" / c) for c in files])
        built = make_workflow(files, {"dataset_dir": ".", **method_args}).parser.get_parsed_content("method")
        assert getattr(built, attribute) == value
