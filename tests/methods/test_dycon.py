"""DyCON: UnCL and FeCL against hand-computed values, the beta schedules, the network, and bundle runs (training,
label poisoning, inference of the saved model)."""

import math

import pytest
import torch

from bundle.losses.dycon import (
    FocalEntropyContrastiveLoss,
    UncertaintyAwareConsistencyLoss,
    gambling_entropy,
    token_labels,
    uncl_beta,
)
from bundle.methods.dycon import DyCONMethod
from bundle.networks.peer import ProjectionVNet
from tests.peer_helpers import poisoned_histories, segment_with_inference, train_tiny_overlay

WEIGHTS = {"sup": 1.0, "uncl": 1.0, "fecl": 1.0}


def _entropy(p):
    return -sum(q * math.log(q + 1e-6) for q in p)


# --------------------------------------------------------------------------------------------------- UnCL
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_uncl_by_hand_at_two_betas(beta):
    p_s, p_t = [[0.8, 0.2], [0.5, 0.5]], [[0.6, 0.4], [0.9, 0.1]]
    logits = torch.log(torch.tensor(p_s)).T.reshape(1, 2, 2, 1, 1)
    teacher = torch.tensor(p_t).T.reshape(1, 2, 2, 1, 1)
    expected = 0.0
    for s, t in zip(p_s, p_t):
        distance = (s[0] - t[0]) ** 2 + (s[1] - t[1]) ** 2
        h_s, h_t = _entropy(s), _entropy(t)
        expected += distance / (math.exp(beta * h_s) + math.exp(beta * h_t)) + beta * (h_s + h_t)
    loss = UncertaintyAwareConsistencyLoss()(logits, teacher, beta)
    assert float(loss) == pytest.approx(expected / 2, rel=1e-5)


def test_uncl_gradient_reaches_only_the_student():
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 2, 4, 4, 4), dim=1).requires_grad_(True)
    UncertaintyAwareConsistencyLoss()(logits, teacher, 1.0).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert teacher.grad is None


def test_beta_schedules():
    assert uncl_beta(0.0) == pytest.approx(1.0)
    assert uncl_beta(1.0) == pytest.approx(math.exp(-0.3))  # paper: never reaches beta_min
    assert uncl_beta(1.0, "exp_decay", 1.0, 0.9, 0.3) == pytest.approx(0.9)  # the max(beta_min, .) floor
    assert uncl_beta(0.5, "geometric", 5.0, 0.5) == pytest.approx(5.0 * math.sqrt(0.1))  # code: 1.58 at 50 %
    assert uncl_beta(1.0, "geometric", 5.0, 0.5) == pytest.approx(0.5)
    assert uncl_beta(0.7, "constant", 2.0) == 2.0
    with pytest.raises(ValueError):
        uncl_beta(0.5, "linear")


# --------------------------------------------------------------------------------------------------- FeCL
def _tokens():
    """Three tokens of one volume: z0 = (1, 0), z1 = (0.6, 0.8) (same class as z0), z2 = (0, 1) (other class)."""
    embed = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]).T.reshape(1, 2, 3, 1, 1)
    return embed, torch.tensor([[0, 0, 1]])


def test_fecl_plain_supcon_by_hand():
    embed, labels = _tokens()
    loss = FocalEntropyContrastiveLoss(temperature=0.5, top_k=0, focal=False, entropy_weight=False)(embed, labels)
    # S = cos / 0.5: S01 = 1.2, S02 = 0, S12 = 1.6. Anchor 0: P = {1}, N = {2}; anchor 1: P = {0}, N = {2};
    # anchor 2: no positive -> 0.
    anchor0 = math.log(math.exp(1.2) + math.exp(0.0)) - 1.2
    anchor1 = math.log(math.exp(1.2) + math.exp(1.6)) - 1.2
    assert float(loss) == pytest.approx((anchor0 + anchor1) / 3, rel=1e-5)


def test_fecl_focal_weights_by_hand():
    embed, labels = _tokens()
    loss = FocalEntropyContrastiveLoss(temperature=0.5, gamma=2.0, top_k=0, entropy_weight=False)(embed, labels)
    # F+ = (1 - 0.6)^2 = 0.16 for both positive pairs; F- = max(cos, 0)^2: 0 for (0, 2), 0.64 for (1, 2)
    anchor0 = 0.16 * (math.log(math.exp(1.2)) - 1.2)  # = 0: its only negative is orthogonal (F- = 0)
    anchor1 = 0.16 * (math.log(math.exp(1.2) + 0.64 * math.exp(1.6)) - 1.2)
    assert float(loss) == pytest.approx((anchor0 + anchor1) / 3, rel=1e-5)
    # the confidence adjustment multiplies each anchor's F+ by exp(H_i)
    entropy = torch.tensor([[0.2, 0.5, 0.9]])
    adjusted = FocalEntropyContrastiveLoss(temperature=0.5, gamma=2.0, top_k=0)(embed, labels, entropy=entropy)
    assert float(adjusted) == pytest.approx((anchor0 * math.exp(0.2) + anchor1 * math.exp(0.5)) / 3, rel=1e-5)


def test_fecl_teacher_top_k_hard_negatives_by_hand():
    embed, labels = _tokens()
    teacher = embed.clone()
    loss = FocalEntropyContrastiveLoss(temperature=0.5, top_k=1, focal=False, entropy_weight=False)(
        embed, labels, teacher
    )
    # h_0 = exp(z0 . zt2 / 0.5) = 1, h_1 = exp(z1 . zt2 / 0.5) = e^1.6 (the only other-class teacher token)
    anchor0 = math.log(math.exp(1.2) + (1.0 + 1.0)) - 1.2
    anchor1 = math.log(math.exp(1.2) + (math.exp(1.6) + math.exp(1.6))) - 1.2
    assert float(loss) == pytest.approx((anchor0 + anchor1) / 3, rel=1e-5)


def test_fecl_no_nan_on_one_class_or_identical_embeddings():
    embed = torch.zeros(2, 4, 2, 2, 2, requires_grad=True)  # zero-padded regions: identical (zero) embeddings
    labels = torch.zeros(2, 8, dtype=torch.long)
    loss = FocalEntropyContrastiveLoss()(embed, labels, embed.detach(), torch.rand(2, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(embed.grad).all()
    same = torch.ones(1, 4, 2, 2, 2, requires_grad=True)
    mixed = FocalEntropyContrastiveLoss()(same, torch.tensor([[0, 1] * 4]), same.detach())
    mixed.backward()
    assert torch.isfinite(mixed) and torch.isfinite(same.grad).all()


def test_token_labels_block_majority_and_gambling_entropy():
    class_map = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    class_map[0, 0, :2, :2, :2] = 1  # block 0 all foreground
    class_map[0, 0, 2:, :2, :2][..., :1] = 1  # block (1, 0, 0): half foreground -> tie -> background
    class_map[0, 0, :2, 2:, :2] = 1  # block (0, 1, 0): 5 of 8 -> foreground
    class_map[0, 0, 0, 2, 0] = class_map[0, 0, 0, 2, 1] = class_map[0, 0, 0, 3, 0] = 0
    labels = token_labels(class_map, (2, 2, 2), 2)
    assert labels.tolist() == [[1, 0, 1, 0, 0, 0, 0, 0]]
    uniform = torch.full((1, 2, 2, 2, 2), 0.5)
    torch.testing.assert_close(gambling_entropy(uniform, (1, 1, 1)), torch.ones(1, 1), atol=1e-4, rtol=0)
    confident = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1).expand(1, 2, 2, 2, 2)
    assert float(gambling_entropy(confident, (1, 1, 1))) < 1e-4
    sharp = gambling_entropy(torch.tensor([0.7, 0.3]).view(1, 2, 1, 1, 1), (1, 1, 1), temperature=0.5)
    p = 0.49 / 0.58  # p^(1/T) normalised
    assert float(sharp) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2), rel=1e-4)


# ----------------------------------------------------------------------------------------- network, method
def test_projection_vnet_shapes():
    net = ProjectionVNet(base_width=4, embed_channels=8, hidden_channels=16).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    logits, embedding = net.forward_embedding(x)
    assert logits.shape == (1, 2, 32, 32, 16) and embedding.shape == (1, 8, 4, 4, 2)  # one token per 8^3 block
    torch.testing.assert_close(net(x), logits)
    unet_head = ProjectionVNet(base_width=4, embed_channels=8, hidden_channels=16, head_variant="unet", use_aspp=True)
    assert unet_head.eval().forward_embedding(x)[1].shape == (1, 8, 4, 4, 2)


def _batch():
    generator = torch.Generator().manual_seed(1)
    labeled = torch.randn(2, 1, 32, 32, 16, generator=generator)
    label = (torch.rand(2, 1, 32, 32, 16, generator=generator) > 0.5).long()
    return labeled, label, torch.randn(2, 1, 32, 32, 16, generator=generator)


def _method(**kwargs):
    torch.manual_seed(0)
    student = ProjectionVNet(base_width=4, embed_channels=8, hidden_channels=16)
    return DyCONMethod(student, WEIGHTS, 10, **kwargs).train()


@pytest.mark.parametrize("options", [{}, {"uncl_on_labeled": True}, {"fecl_on_labeled": True, "fecl_top_k": 0}])
def test_method_terms_finite_and_teacher_frozen(options):
    method = _method(**options)
    losses = method(*_batch(), 0)
    assert set(losses) == set(WEIGHTS) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    before = [p.clone() for p in method.teacher.parameters()]
    method.after_step(5)  # alpha = min(1 - 1/6, 0.99)
    for old, new, student in zip(before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, old * (5 / 6) + student.detach() / 6)
    assert method.beta(5) == pytest.approx(math.exp(-0.3 * 0.5))


def test_fecl_tokens_come_from_the_teacher_not_from_a_label():
    """FeCL of the unlabeled volumes is a function of the images only: the labeled ground truth does not enter it
    (``fecl_on_labeled`` False), so changing the labels leaves ``fecl`` and ``uncl`` bit-identical."""
    method = _method()
    labeled, label, unlabeled = _batch()
    torch.manual_seed(5)
    first = method(labeled, label, unlabeled, 0)
    torch.manual_seed(5)
    second = method(labeled, 1 - label, unlabeled, 0)
    assert torch.equal(first["fecl"], second["fecl"]) and torch.equal(first["uncl"], second["uncl"])
    assert not torch.equal(first["sup"], second["sup"])


# -------------------------------------------------------------------------------------------------- bundle
TINY = {"patch_size": [32, 32, 16], "method#student#embed_channels": 16, "method#student#hidden_channels": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-iteration bundle run of the overlay on tiny NIfTI data (32x32x16 patches: 4x4x2 tokens)."""
    return train_tiny_overlay(tmp_path_factory, "dycon", TINY)


def test_overlay_trains_every_term_and_writes_model(trained):
    workflow, history = trained["workflow"], trained["history"]
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 3 and len(history) == 3
    assert workflow.parser["train#preprocessing#augment"] is True
    for output in history:
        assert {f"loss_{name}" for name in WEIGHTS} <= set(output)
        assert all(math.isfinite(v) for v in output.values())
    state = torch.load(trained["out"] / "models" / "model.pt", weights_only=True)
    assert state and all(k.startswith("net.") for k in state) and any(k.startswith("net.projection") for k in state)


def test_saved_model_runs_through_inference_json_alone(trained, tmp_path):
    segment_with_inference(trained, tmp_path / "pred", sw_strides=[8, 8, 8])


def test_poisoned_unlabeled_labels_change_no_loss(tmp_path):
    histories = poisoned_histories("dycon", tmp_path, TINY)
    assert all("loss_fecl" in output for output in histories[0])
