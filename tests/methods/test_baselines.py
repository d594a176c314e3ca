"""The baseline methods (Mean Teacher, UA-MT, CPS, BCP): their formulas on hand-made inputs, and each overlay run
through ``monai.bundle`` on tiny synthetic data (spec ``shared/specs/baselines.md``)."""

import json
import math
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigWorkflow
from monai.engines.utils import IterationEvents
from torch import nn

from bundle.losses.baselines import CopyPasteLoss, HalfCEDiceLoss, RegionDiceLoss, SoftmaxMSELoss
from bundle.losses.ramps import stepped_rampup
from bundle.methods.bcp import BidirectionalCopyPasteMethod, copy_paste_mask, pseudo_label
from bundle.methods.cps import CrossPseudoSupervisionMethod
from bundle.methods.ema import ema_alpha, ema_update_
from bundle.methods.mean_teacher import MeanTeacherMethod
from bundle.methods.ua_mt import UncertaintyAwareMeanTeacherMethod, uncertainty_threshold
from bundle.networks.subnets import SoftmaxEnsemble, SoftmaxOutput
from tests.conftest import REPO_ROOT
from tests.training_helpers import at_first_iteration, make_workflow, tiny_conv_net, tiny_overrides, train_and_record

METHODS = ["mean_teacher", "ua_mt", "cps", "bcp"]
#: loss terms each overlay logs at its last test iteration (BCP is then self-training).
LAST_TERMS = {
    "mean_teacher": {"sup", "cons"},
    "ua_mt": {"sup", "cons"},
    "cps": {"sup", "cps"},
    "bcp": {"in", "out"},
}


# --------------------------------------------------------------------------------------------------- helpers
class FixedLogits(nn.Module):
    """Returns fixed logits ``(B, 2, 2, 2, 2)`` whatever the input (so teacher noise changes nothing), plus a
    learnable offset; counts its calls and records the batch sizes."""

    def __init__(self, margins):
        super().__init__()
        margins = torch.as_tensor(margins, dtype=torch.float32).view(1, 1, 2, 2, 2)
        self.register_buffer("logits", torch.cat([torch.zeros_like(margins), margins], dim=1))
        self.offset = nn.Parameter(torch.zeros(1, 2, 1, 1, 1))
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.logits.expand(x.shape[0], -1, -1, -1, -1) + self.offset


class ThresholdTeacher(nn.Module):
    """Foreground logit ``10 (x - 0.5)``: a teacher whose hard prediction is ``1[x > 0.5]``."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 10.0 * (x - 0.5)], dim=1)


class Recorder(nn.Module):
    """Wraps a network and records the inputs of every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def fixed_mask(shape=(4, 4, 4)):
    """A copy-paste mask ``(1, 1, *shape)``: 0 in the cube ``[1:3]^3``, 1 outside."""
    mask = torch.ones((1, 1, *shape))
    mask[..., 1:3, 1:3, 1:3] = 0.0
    return mask


def method_overrides(method, dataset_dir, out_dir, pretrain_iterations=1, selftrain_iterations=2, **extra):
    """Tiny settings: 16^3 patches (32^3 for BCP, whose half-batches of one volume need > 1 value per channel at
    the 1/16 bottleneck), base_width 4, 3 iterations (BCP: 1 pre-training + 2 self-training)."""
    overrides = tiny_overrides(dataset_dir, out_dir, val_interval=100, **extra)
    if method == "bcp":
        overrides["patch_size"] = extra.get("patch_size", [32, 32, 32])
        overrides["method#pretrain_iterations"] = pretrain_iterations
        overrides["max_iterations"] = pretrain_iterations + selftrain_iterations
    return overrides


def write_label(path, seed):
    """Overwrite the NIfTI label at ``path`` with random 0/1 voxels on the same grid."""
    original = nib.load(str(path))
    rng = np.random.default_rng(seed)
    poisoned = rng.integers(0, 2, size=original.shape).astype(np.uint8)
    nib.save(nib.Nifti1Image(poisoned, original.affine), str(path))


# --------------------------------------------------------------------------------------------------------- EMA
def test_ema_alpha_warmup_and_constant():
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(98, 0.99) == pytest.approx(1 - 1 / 99)
    assert ema_alpha(99, 0.99) == 0.99 and ema_alpha(5000, 0.99) == 0.99
    assert ema_alpha(0, 0.99, warmup=False) == 0.99


def test_ema_update_equals_formula_on_hand_made_parameters():
    teacher = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        teacher[0].bias.copy_(torch.tensor([10.0, -10.0]))
        student[0].weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
        student[0].bias.copy_(torch.tensor([0.0, 0.0]))
        student[1].running_mean.copy_(torch.tensor([3.0, 3.0]))
    ema_update_(teacher, student, alpha=0.75)
    torch.testing.assert_close(teacher[0].weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    torch.testing.assert_close(teacher[0].bias, torch.tensor([7.5, -7.5]))
    torch.testing.assert_close(teacher[1].weight, torch.ones(2))  # 0.75 * 1 + 0.25 * 1
    torch.testing.assert_close(teacher[1].running_mean, torch.zeros(2))  # buffers: the teacher's own
    ema_update_(teacher, student, alpha=0.75, copy_buffers=True)
    torch.testing.assert_close(teacher[1].running_mean, torch.tensor([3.0, 3.0]))


def test_mean_teacher_teacher_is_frozen_saved_and_follows_ema():
    method = MeanTeacherMethod(tiny_conv_net(0), {"sup": 1.0, "cons": 0.1}, max_iterations=10)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for p in method.student.parameters()}
    assert any(k.startswith("teacher.") for k in method.state_dict())
    for teacher_p, student_p in zip(method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(teacher_p, student_p)  # a copy at start
    before = [p.clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(4)  # alpha_4 = min(1 - 1/5, 0.99) = 0.8
    for old, new, student_p in zip(before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.8 * old + 0.2 * student_p)
    method.after_step(0)  # alpha_0 = 0: the teacher becomes the student
    for teacher_p, student_p in zip(method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(teacher_p, student_p)


# ------------------------------------------------------------------------------------------------------- ramps
@pytest.mark.parametrize(
    "t, weight, threshold",
    [(0, 0.000674, 0.521028), (150, 0.000862, 0.521355), (1500, 0.006005, 0.530267), (3000, 0.028650, 0.569508),
     (4500, 0.073162, 0.646640), (5850, 0.099688, 0.692607), (5999, 0.099688, 0.693147), (6000, 0.1, 0.693147)],
)  # fmt: skip
def test_ramp_fixtures(t, weight, threshold):
    """Mean Teacher's consistency weight and UA-MT's uncertainty threshold on the authors' 6000-iteration schedule."""
    assert 0.1 * stepped_rampup(t, 6000, 150) == pytest.approx(weight, abs=1e-6)
    method = MeanTeacherMethod(tiny_conv_net(), {"sup": 1.0, "cons": 0.1}, 6000, rampup_iters=6000, rampup_step=150)
    assert method.term_weights(t) == pytest.approx({"sup": 1.0, "cons": weight}, abs=1e-6)
    assert uncertainty_threshold(t, 6000, 2) == pytest.approx(threshold, abs=1e-6)


def test_overlay_ramps_span_the_run_in_forty_steps():
    """The ``rampup_iters`` / ``rampup_step`` defaults: 6000 / 150 on LA, the whole run in general."""
    small = {"method#student#base_width": 4}
    parser_la = make_workflow(
        ["train.json", "datasets/la.json", "methods/mean_teacher.json"], {"dataset_dir": "unused", **small}
    ).parser
    method = parser_la.get_parsed_content("method")
    assert (method.rampup_iters, method.rampup_step) == (6000, 150)
    method = make_workflow(
        ["train.json", "methods/ua_mt.json"], {"max_iterations": 600, **small}
    ).parser.get_parsed_content("method")
    assert (method.rampup_iters, method.rampup_step, method.uncertainty_rampup_iters) == (600, 15, 600)


# ------------------------------------------------------------------------------------------------------- UA-MT
MARGINS = [0.0, 0.2, 0.5, 1.0, 1.1, 2.0, 4.0, 20.0]  # entropies 0.6931, 0.688, 0.663, 0.582, 0.562, 0.365, 0.09, 0


@pytest.mark.parametrize(
    "t, expected_mask",
    [(0, [0, 0, 0, 0, 0, 1, 1, 1]), (3000, [0, 0, 0, 0, 1, 1, 1, 1]), (6000, [1, 1, 1, 1, 1, 1, 1, 1])],
)
def test_ua_mt_uncertainty_mask_at_known_iterations(t, expected_mask):
    method = UncertaintyAwareMeanTeacherMethod(
        FixedLogits(MARGINS), {"sup": 1.0, "cons": 0.1}, 6000, uncertainty_rampup_iters=6000, mc_samples=8
    )
    images = torch.zeros(3, 1, 2, 2, 2)
    method.teacher.batch_sizes.clear()
    mask = method.consistency_mask(images, t)
    assert method.teacher.batch_sizes == [6, 6, 6, 6]  # T/2 = 4 passes on the duplicated batch [x; x]
    assert mask.shape == (3, 1, 2, 2, 2)
    expected = torch.tensor(expected_mask, dtype=torch.float32).view(1, 1, 2, 2, 2).expand(3, -1, -1, -1, -1)
    torch.testing.assert_close(mask, expected)
    assert method.last_threshold == pytest.approx(uncertainty_threshold(t, 6000, 2))
    assert method.last_mask_fraction == pytest.approx(sum(expected_mask) / 8)


def test_ua_mt_consistency_is_the_mean_over_certain_voxels():
    method = UncertaintyAwareMeanTeacherMethod(FixedLogits(MARGINS), {"sup": 1.0, "cons": 0.1}, 6000)
    with torch.no_grad():
        method.student.offset.copy_(torch.tensor([0.0, -1.0]).view(1, 2, 1, 1, 1))  # the student differs
    labeled, unlabeled = torch.zeros(1, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2)
    label = torch.ones(1, 1, 2, 2, 2, dtype=torch.long)
    terms = {k: v.detach() for k, v in method.compute_losses(labeled, label, unlabeled, iteration=0).items()}
    student = torch.softmax(method.student.logits + method.student.offset.detach(), dim=1)
    teacher = torch.softmax(method.teacher.logits, dim=1)
    certain = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1.0]).view(1, 1, 2, 2, 2)
    expected = (certain * (student - teacher) ** 2).sum() / (2 * certain.sum())
    assert float(terms["cons"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["sup"]) == pytest.approx(float(HalfCEDiceLoss("fg_sq")(student.log(), label)), rel=1e-5)


# --------------------------------------------------------------------------------------------------------- CPS
def test_cps_each_network_gets_gradient_only_through_its_own_prediction():
    net1, net2 = tiny_conv_net(1), tiny_conv_net(2)
    method = CrossPseudoSupervisionMethod(net1, net2, {"sup": 0.0, "cps": 1.0}, 10, init="default")
    method.eval()  # no randomness; the gradient rule is the same in train mode
    torch.manual_seed(3)
    labeled, unlabeled = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    label = torch.randint(0, 2, (2, 1, 4, 4, 4))
    method.compute_losses(labeled, label, unlabeled, iteration=0)["cps"].backward()
    grads = {name: p.grad.clone() for name, p in method.named_parameters()}

    # Reference: each net alone against the other's argmax, computed as a constant.
    method.zero_grad()
    with torch.no_grad():
        target_from_2 = net2(torch.cat([labeled, unlabeled]))[2:].argmax(1)
        target_from_1 = net1(torch.cat([labeled, unlabeled]))[2:].argmax(1)
    F.cross_entropy(net1(torch.cat([labeled, unlabeled]))[2:], target_from_2).backward()
    F.cross_entropy(net2(torch.cat([labeled, unlabeled]))[2:], target_from_1).backward()
    assert target_from_1.float().mean() not in (0.0, 1.0) or target_from_2.float().mean() not in (0.0, 1.0)
    for name, p in method.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_cps_weights_init_and_inference_network():
    net1, net2 = tiny_conv_net(1), tiny_conv_net(1)  # identical draws
    method = CrossPseudoSupervisionMethod(net1, net2, {"sup": 1.0, "cps": 0.1}, 6000)
    assert not torch.equal(net1[0].weight, net2[0].weight)  # net 2's Conv3d weights re-drawn (Xavier)
    assert method.term_weights(3000) == pytest.approx({"sup": 1.0, "cps": 0.028650}, abs=1e-6)
    assert isinstance(method.inference_network(), SoftmaxOutput) and method.inference_network().net is net1
    mean = CrossPseudoSupervisionMethod(tiny_conv_net(1), tiny_conv_net(2), {"sup": 1.0}, 10, infer_net="mean")
    assert isinstance(mean.inference_network(), SoftmaxEnsemble) and not mean.uses_unlabeled


# --------------------------------------------------------------------------------------------------------- BCP
def test_copy_paste_mask_cube_size_and_position():
    torch.manual_seed(0)
    for shape in ((112, 112, 80), (32, 32, 32), (30, 3, 16)):
        mask = copy_paste_mask(shape, 2 / 3)
        assert mask.shape == (1, 1, *shape)
        inside = (mask[0, 0] == 0).nonzero()
        sizes = [int(s * 2 / 3) for s in shape]
        assert int((mask == 0).sum()) == math.prod(sizes)
        for axis, (size, cube) in enumerate(zip(shape, sizes)):
            low, high = int(inside[:, axis].min()), int(inside[:, axis].max())
            assert high - low + 1 == cube and 0 <= low <= max(size - cube - 1, 0)
    assert math.prod(int(s * 2 / 3) for s in (112, 112, 80)) == 74 * 74 * 53


def test_pseudo_label_keeps_the_largest_26_connected_component():
    prob_fg = torch.zeros(1, 6, 6, 6)
    prob_fg[0, 0:2, 0:2, 0:2] = 0.9  # 8 voxels
    prob_fg[0, 2, 2, 2] = 0.9  # touches the cube by a corner only: 26-connected to it
    prob_fg[0, 4:6, 4:6, 5] = 0.7  # 4 voxels, separate
    prob = torch.stack([1 - prob_fg, prob_fg], dim=1)
    kept = pseudo_label(prob)
    assert kept.shape == (1, 1, 6, 6, 6) and kept.dtype == torch.long
    assert int(kept.sum()) == 9 and int(kept[0, 0, 2, 2, 2]) == 1 and int(kept[0, 0, 4:, 4:, 5].sum()) == 0
    assert int(pseudo_label(prob, keep_largest=False).sum()) == 13
    assert int(pseudo_label(torch.stack([torch.ones(1, 3, 3, 3), torch.zeros(1, 3, 3, 3)], 1)).sum()) == 0


def make_bcp(pretrain_iterations=2):
    method = BidirectionalCopyPasteMethod(
        Recorder(tiny_conv_net(4)), {"pre": 1.0, "in": 1.0, "out": 1.0}, 10, pretrain_iterations=pretrain_iterations
    )
    method.draw_mask = lambda shape, device: fixed_mask(tuple(shape))
    method.eval()
    return method


@torch.no_grad()
def test_bcp_pretraining_mixes_image_and_label_with_the_same_mask():
    method = make_bcp()
    torch.manual_seed(5)
    images, labels = torch.randn(2, 1, 4, 4, 4), torch.randint(0, 2, (2, 1, 4, 4, 4))
    terms = method.compute_losses(images, labels, torch.randn(2, 1, 4, 4, 4), iteration=1)
    assert set(terms) == {"pre"} and int(method.stage) == 1
    mask = fixed_mask()
    (student_input,) = method.student.inputs
    torch.testing.assert_close(student_input, images[:1] * mask + images[1:] * (1 - mask))
    mixed_label = torch.where(mask.bool(), labels[:1], labels[1:])
    expected = HalfCEDiceLoss("bcp")(method.student.net(student_input), mixed_label)
    assert float(terms["pre"]) == pytest.approx(float(expected), rel=1e-6)
    wrong = HalfCEDiceLoss("bcp")(method.student.net(student_input), torch.where(mask.bool(), labels[1:], labels[:1]))
    assert float(terms["pre"]) != pytest.approx(float(wrong), rel=1e-3)


@torch.no_grad()
def test_bcp_selftraining_mixes_with_one_mask_and_teacher_pseudo_labels():
    method = make_bcp()
    method.teacher = ThresholdTeacher()
    torch.manual_seed(6)
    labeled = torch.rand(2, 1, 4, 4, 4) - 1.0
    labels = torch.randint(0, 2, (2, 1, 4, 4, 4))
    unlabeled = torch.zeros(2, 1, 4, 4, 4)
    unlabeled[0, 0, 0:2, 0:2, 0:2] = 1.0  # teacher foreground: a large blob ...
    unlabeled[0, 0, 3, 3, 3] = 1.0  # ... and a lone voxel that LCC removes
    unlabeled[1, 0, 1:4, 1, 1] = 1.0
    terms = method.compute_losses(labeled, labels, unlabeled, iteration=2)
    assert set(terms) == {"in", "out"} and int(method.stage) == 2
    mask = fixed_mask()
    image_in, image_out = method.student.inputs
    torch.testing.assert_close(image_in, labeled[:1] * mask + unlabeled[:1] * (1 - mask))  # unlabeled cube inward
    torch.testing.assert_close(image_out, unlabeled[1:] * mask + labeled[1:] * (1 - mask))  # labeled cube outward
    pseudo_a = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    pseudo_a[0, 0, 0:2, 0:2, 0:2] = 1
    pseudo_b = (unlabeled[1:] > 0.5).long()
    loss = CopyPasteLoss()
    net = method.student.net
    expected_in = loss(net(image_in), labels[:1], pseudo_a, mask, 1.0, 0.5)
    expected_out = loss(net(image_out), pseudo_b, labels[1:], mask, 0.5, 1.0)
    assert float(terms["in"]) == pytest.approx(float(expected_in), rel=1e-6)
    assert float(terms["out"]) == pytest.approx(float(expected_out), rel=1e-6)
    # By hand for the inward image: Dice/CE of the labeled part on M, of the pseudo-labelled cube on 1 - M.
    logits = net(image_in)
    dice, inside = RegionDiceLoss(), 1 - mask
    ce = F.cross_entropy(logits, labels[:1, 0], reduction="none")
    ce_pseudo = F.cross_entropy(logits, pseudo_a[:, 0], reduction="none")
    by_hand = 0.5 * (
        dice(logits, labels[:1], mask)
        + 0.5 * dice(logits, pseudo_a, inside)
        + (mask[:, 0] * ce).sum() / mask.sum()
        + 0.5 * (inside[:, 0] * ce_pseudo).sum() / inside.sum()
    )
    assert float(terms["in"]) == pytest.approx(float(by_hand), rel=1e-5)


def test_bcp_stages_weights_and_ema():
    method = make_bcp(pretrain_iterations=3)
    assert method.stage_starts == (3,)
    assert method.active_terms(2) == {"pre": 1.0} and method.active_terms(3) == {"in": 1.0, "out": 1.0}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    method.after_step(1)  # pre-training: no EMA
    for old, new in zip(teacher_before, method.teacher.parameters()):
        torch.testing.assert_close(old, new)
    method.on_stage_start(1)  # the trainer at t = 3: teacher <- pre-trained student
    assert int(method.stage) == 2
    for teacher_p, student_p in zip(method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(teacher_p, student_p)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    method.after_step(3)  # constant alpha = 0.99 from the first self-training step
    for old, new, student_p in zip(teacher_before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * student_p)


# ------------------------------------------------------------------------------------- losses used by the methods
def test_softmax_mse_without_mask_is_the_plain_mean():
    torch.manual_seed(7)
    logits, target = torch.randn(2, 2, 3, 3, 3), torch.softmax(torch.randn(2, 2, 3, 3, 3), 1)
    expected = ((torch.softmax(logits, 1) - target) ** 2).mean()
    assert float(SoftmaxMSELoss()(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    assert float(SoftmaxMSELoss()(logits, target, torch.zeros(2, 1, 3, 3, 3))) == 0.0


def test_dice_variants_by_hand():
    torch.manual_seed(8)
    logits, label = torch.randn(2, 2, 3, 3, 3), torch.randint(0, 2, (2, 1, 3, 3, 3))
    p = torch.softmax(logits, 1)
    y = torch.cat([1 - label, label], 1).float()
    ce = F.cross_entropy(logits, label[:, 0])
    fg = 1 - (2 * (p[:, 1] * y[:, 1]).sum() + 1e-5) / ((p[:, 1] ** 2).sum() + (y[:, 1] ** 2).sum() + 1e-5)
    per_class = [
        1 - (2 * (p[:, c] * y[:, c]).sum() + 1e-5) / ((p[:, c] ** 2).sum() + (y[:, c] ** 2).sum() + 1e-5)
        for c in range(2)
    ]
    dims = (2, 3, 4)
    bcp = 1 - ((2 * (p * y).sum(dims) + 1e-5) / ((p + y).sum(dims) + 1e-5)).mean()
    assert float(HalfCEDiceLoss("fg_sq")(logits, label)) == pytest.approx(float(0.5 * (ce + fg)), rel=1e-5)
    mean_sq = 0.5 * (ce + sum(per_class) / 2)
    assert float(HalfCEDiceLoss("mean_sq")(logits, label)) == pytest.approx(float(mean_sq), rel=1e-5)
    assert float(HalfCEDiceLoss("bcp")(logits, label)) == pytest.approx(float(0.5 * (ce + bcp)), rel=1e-5)


# ----------------------------------------------------------------------------------------- overlays and bundle runs
@pytest.mark.parametrize("method", METHODS)
def test_overlay_holds_its_method_and_its_terms(method):
    overlay = json.loads((REPO_ROOT / "configs" / "methods" / f"{method}.json").read_text())
    assert set(overlay) == {"_desc_", "train#preprocessing#augment", "method"}
    terms = overlay["method"]["loss_weights"]
    assert set(terms) == set(LAST_TERMS[method]) | ({"pre"} if method == "bcp" else set())


@pytest.fixture(scope="module", params=METHODS)
def clean_run(request, tiny_dataset, tmp_path_factory):
    """One 3-iteration bundle run of each overlay on the tiny dataset (shared by the tests below)."""
    method = request.param
    out_dir = tmp_path_factory.mktemp(f"run_{method}")
    workflow, records = train_and_record(
        ["train.json", f"methods/{method}.json"], method_overrides(method, tiny_dataset, out_dir)
    )
    return method, out_dir, workflow, records


def test_each_overlay_trains_through_the_bundle(clean_run):
    method, out_dir, workflow, records = clean_run
    trainer = workflow.parser.get_parsed_content("train#trainer")
    plugin = workflow.parser.get_parsed_content("network")
    assert trainer.state.iteration == 3 and len(records) == 3
    last = records[-1]
    assert {k[len("loss_") :] for k in last if k != "loss"} == LAST_TERMS[method]
    weights = plugin.term_weights(2)
    assert last["loss"] == pytest.approx(sum(weights[k[5:]] * v for k, v in last.items() if k != "loss"), rel=1e-5)
    assert all(math.isfinite(v) for record in records for v in record.values())
    if method == "bcp":
        assert [set(r) for r in records] == [{"loss", "loss_pre"}] + [{"loss", "loss_in", "loss_out"}] * 2
        assert int(plugin.stage) == 2
    # models/model.pt: the flat state dict of one V-Net's softmax; the resume checkpoint holds every network.
    state = torch.load(out_dir / "models" / "model.pt", weights_only=True)
    assert state and all(k.startswith("net.") for k in state)
    saved = torch.load(out_dir / "checkpoints" / "checkpoint_final.pt", weights_only=True)["method"]
    prefixes = {k.split(".")[0] for k in saved}
    if method == "cps":
        assert prefixes == {"net1", "net2"}
        torch.testing.assert_close(state, {"net." + k[5:]: v for k, v in saved.items() if k.startswith("net1.")})
    else:
        assert {"student", "teacher"} <= prefixes
        torch.testing.assert_close(state, {"net." + k[8:]: v for k, v in saved.items() if k.startswith("student.")})
        assert all(not p.requires_grad for p in plugin.teacher.parameters())
        teacher = {k: v for k, v in saved.items() if k.startswith("teacher.")}
        student = {"teacher." + k[8:]: v for k, v in saved.items() if k.startswith("student.")}
        assert any(not torch.equal(teacher[k], student[k]) for k in teacher if k.endswith("weight"))
    optimizer = workflow.parser.get_parsed_content("optimizer")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in plugin.trainable_parameters()}
    assert not optimized & {id(p) for p in getattr(plugin, "teacher", nn.Module()).parameters()}


def test_labels_of_unlabeled_items_change_no_loss(clean_run, tiny_dataset, tmp_path):
    """Poison the label files of the items that ``num_labeled=2`` demotes to unlabeled: every loss of every
    iteration must be identical; poisoning a labeled item's label (control) must change the losses."""
    method, _, _, clean = clean_run
    spec = json.loads((REPO_ROOT / tiny_dataset / "dataset.json").read_text())
    demoted = [item["label"] for item in spec["training"] if "label" in item][2:]
    assert len(demoted) == 2
    poisoned_dir = tmp_path / "poisoned"
    shutil.copytree(tiny_dataset, poisoned_dir)
    for index, label in enumerate(demoted):
        write_label(poisoned_dir / label, seed=index)
    _, poisoned = train_and_record(
        ["train.json", f"methods/{method}.json"], method_overrides(method, str(poisoned_dir), tmp_path / "p")
    )
    assert poisoned == clean
    if method == "mean_teacher":
        control_dir = tmp_path / "control"
        shutil.copytree(tiny_dataset, control_dir)
        write_label(control_dir / spec["training"][0]["label"], seed=9)
        _, control = train_and_record(
            ["train.json", f"methods/{method}.json"], method_overrides(method, str(control_dir), tmp_path / "c")
        )
        assert control[0]["loss_sup"] != pytest.approx(clean[0]["loss_sup"], rel=1e-4)


def test_inference_json_alone_loads_a_baseline_model(clean_run, tiny_dataset, tmp_path):
    method, out_dir, _, _ = clean_run
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        dataset_dir=f"{tiny_dataset}/imagesTr",
        output_dir=str(tmp_path / "pred"),
        ckpt_path=str(out_dir / "models" / "model.pt"),  # base_width, patch: the model's (model_metadata.json)
        sw_strides=[8, 8, 8],
        sw_batch_size=2,
    )
    workflow.initialize()
    workflow.run()
    outputs = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(outputs) == 9
    prediction = np.asarray(nib.load(str(outputs[0])).dataobj)
    assert prediction.shape == (20, 20, 18) and set(np.unique(prediction)) <= {0, 1}


def test_evaluate_overlay_scores_a_baseline_model(clean_run, tiny_dataset, tmp_path):
    method, out_dir, _, _ = clean_run
    if method != "mean_teacher":
        pytest.skip("one single-network method is enough for evaluate.json")
    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / "configs" / c) for c in ("train.json", f"methods/{method}.json", "evaluate.json")],
        logging_file=False,
        workflow_type="infer",
        **tiny_overrides(tiny_dataset, tmp_path, ckpt_path=str(out_dir / "models" / "model.pt"), sw_strides=[8, 8, 8]),
    )
    workflow.initialize()
    workflow.run()
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "summary.json").is_file()


# ------------------------------------------------------------------------------------------------- BCP resume
def test_resumed_bcp_knows_its_stage(tiny_dataset, tmp_path):
    """pre-train 2 + self-train 1, checkpoints at iteration 2 (the stage boundary) and 3. Resuming from 3 continues
    self-training with the saved teacher; resuming from 2 starts self-training there (teacher <- student)."""
    first_overrides = method_overrides(
        "bcp", tiny_dataset, tmp_path / "a", pretrain_iterations=2, selftrain_iterations=1
    )
    train_and_record(["train.json", "methods/bcp.json"], first_overrides)
    checkpoints = tmp_path / "a" / "checkpoints"
    final = torch.load(checkpoints / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3 and int(final["method"]["stage"]) == 2

    for start, checkpoint in ((3, "checkpoint_final.pt"), (2, "checkpoint_iteration=2.pt")):
        overrides = method_overrides(
            "bcp", tiny_dataset, tmp_path / f"resume{start}", pretrain_iterations=2, selftrain_iterations=2,
            resume_from=str(checkpoints / checkpoint),
        )  # fmt: skip
        workflow = make_workflow(["train.json", "methods/bcp.json"], overrides)
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        method = workflow.parser.get_parsed_content("network")
        seen = at_first_iteration(trainer, stage=lambda: int(method.stage))

        @trainer.on(IterationEvents.FORWARD_COMPLETED)
        def _after_forward(engine):
            if "teacher_is_student" not in seen:
                seen["teacher_is_student"] = all(
                    torch.equal(t, s) for t, s in zip(method.teacher.parameters(), method.student.parameters())
                )

        workflow.run()
        assert seen["iteration"] == start + 1  # ignite counts from 1
        assert seen["stage"] == (2 if start == 3 else 1)  # the restored buffer: the stage of the saved iteration
        assert int(method.stage) == 2 and set(trainer.state.output) >= {"loss_in", "loss_out"}
        assert "loss_pre" not in trainer.state.output
        # Resumed mid-self-training the EMA teacher is the saved one; at the boundary it restarts from the student.
        assert seen["teacher_is_student"] == (start == 2)


def test_bcp_cli_runs_both_stages(tiny_dataset, tmp_path):
    """The documented command, through ``python -m monai.bundle``: one pre-training and one self-training step."""
    overrides = method_overrides("bcp", tiny_dataset, tmp_path, pretrain_iterations=1, selftrain_iterations=1)
    configs = "['configs/train.json','configs/methods/bcp.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs]
    for key, value in overrides.items():
        command += [f"--{key}", str(value).replace(" ", "")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "iteration 2/2" in result.stdout + result.stderr
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 and int(saved["method"]["stage"]) == 2
