"""Probe a dual-network or student-teacher method on LA crops: each term's weighted gradient and its alignment with
the supervised one, and how good its pseudo-labels are on the unlabeled training cases.

A few batches decide what deserves a full training run. Run from the bundle root, e.g. on a benchmark checkpoint::

    python scripts/probe_terms.py --dataset_dir /path/to/LA \
        --checkpoint runs/benchmark/la_cpu_dual_journal_k8_seed1337/checkpoints/checkpoint_iteration=250.pt \
        --iteration 250 --output docs/results/term_probe_dual_journal_k8_seed1337_it250.json

``--output`` writes a record (kind ``term_probe``: the numbers, the command, commit and machine) that
``python scripts/benchmark.py report`` turns into a table of ``docs/RESULTS.md`` when it lies in ``docs/results``.

The unlabeled cases' labels are read for the diagnostics only (pseudo-label Dice and foreground fractions); they
never reach a loss. The cases come from the benchmark's training part (the first ``train_cases`` of the list), never
from its test part.
"""

import os
import sys
from typing import Any, Dict, List, Tuple

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarking.runs import (  # noqa: E402
    display_command,
    git_commit,
    hardware,
    method_configs,
    parse_bundle,
    protocol_overrides,
    write_json,
)
from bundle.data.datalists import la_items, read_case_list  # noqa: E402
from bundle.data.transforms import training_transforms  # noqa: E402
from bundle.losses.dual_network.reliability import entropy_uncertain, union_pseudo_label  # noqa: E402


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Foreground Dice of two boolean maps (1 when both are empty)."""
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def crops(items: List[Dict[str, str]], patch: List[int], resample: float, count: int, seed: int) -> List[Dict]:
    """``count`` random labeled crops ``{"image": (1, *patch), "label": (1, *patch)}`` from ``items``."""
    transform = training_transforms(["image", "label"], patch, resample)
    transform.set_random_state(seed)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(items), (count,), generator=generator).tolist()
    return [transform(items[i]) for i in picks]


def pseudo_label_stats(model: torch.nn.Module, x_u: torch.Tensor, y_u: torch.Tensor) -> Dict[str, float]:
    """Foreground fractions and Dice against the truth ``y_u`` (bool ``(B, *spatial)``) of the predictions that the
    method learns from on the unlabeled crops: both subnets and the EFS union target (dual-network methods), or the
    student and the teacher (student-teacher methods)."""
    if hasattr(model, "net_a"):
        prob_a, prob_b = (torch.softmax(net(x_u).float(), 1) for net in (model.net_a, model.net_b))
        names = ("a", "b")
    else:
        prob_a = torch.softmax(model.student(x_u).float(), 1)
        prob_b = model.teacher_probabilities(x_u)
        names = ("student", "teacher")
    preds = dict(zip(names, (prob_a.argmax(1), prob_b.argmax(1))))
    stats = {"fg_truth": float(y_u.float().mean())}
    for name, pred in preds.items():
        stats[f"fg_{name}"] = float((pred > 0).float().mean())
        stats[f"dice_{name}"] = dice(pred > 0, y_u)
    if hasattr(model, "entropy_filtered"):
        union = union_pseudo_label(*preds.values()) > 0
        percentile = model.entropy_filtered.percentile
        kept = ~(entropy_uncertain(prob_a, percentile) & entropy_uncertain(prob_b, percentile))
        stats["fg_union"] = float(union.float().mean())
        stats["dice_union"] = dice(union, y_u)
        stats["dice_union_kept"] = dice(union & kept, y_u & kept)
        stats["efs_kept"] = float(kept.float().mean())
    return stats


def gradient(loss: torch.Tensor, params: List[torch.nn.Parameter]) -> torch.Tensor:
    """d loss / d params flattened into one float64 vector (a parameter the loss does not reach gives zeros)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    flat = [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]
    return torch.cat(flat).double()


def alignment(g: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
    """(‖g‖ / ‖reference‖, cosine between them) of two gradient vectors, summed in float64: in fp32 the sums over
    the ~10^7 weights of a V-Net drift by ~1e-3, which printed a term's cosine with itself as 1.003."""
    g, reference = g.double(), reference.double()
    return float(g.norm() / reference.norm()), float(torch.nn.functional.cosine_similarity(g, reference, dim=0))


def probe(
    dataset_dir: str,
    method: str = "dual_journal",
    checkpoint: str = "",
    iteration: int = 250,
    num_labeled: int = 8,
    train_cases: int = 60,
    batches: int = 4,
    seed: int = 0,
    output: str = "",
    **overrides: Any,
) -> Dict[str, Any]:
    """Per term: ``norm`` of its weighted gradient relative to the supervised (``sup`` + ``cr``) one and the
    ``cosine`` between them, averaged over ``batches`` batches of 2 labeled + 2 unlabeled crops at ``iteration``
    (which sets the ramps); and :func:`pseudo_label_stats` on the unlabeled crops. ``method`` is a preset with a
    dual-network or a student-teacher method."""
    configs = method_configs(method, "cpu")
    parser = parse_bundle(configs, {"dataset_dir": dataset_dir, **protocol_overrides(configs), **overrides})
    model = parser.get_parsed_content("method")
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["method"])
    model.train()
    torch.manual_seed(seed)  # dropout and the teachers' input noise: the same draws in every run
    cases = read_case_list(os.path.join(dataset_dir, "train.list"))[:train_cases]
    patch, resample = list(parser["patch_size"]), float(parser["resample_factor"])
    labeled = crops(la_items(dataset_dir, cases[:num_labeled]), patch, resample, 2 * batches, seed)
    unlabeled = crops(la_items(dataset_dir, cases[num_labeled:]), patch, resample, 2 * batches, seed + 1)
    params = list(model.trainable_parameters())
    weights = model.term_weights(iteration)
    if "sup" not in weights:
        raise SystemExit(
            f"Cannot probe {method}: its loss has no separate supervised term ('sup'; terms {sorted(weights)}), "
            "which the probe measures every term against (e.g. BCP mixes labeled and unlabeled voxels in each term)."
        )
    sums: Dict[str, Dict[str, float]] = {}
    labels: Dict[str, float] = {}
    for b in range(batches):
        pair = slice(2 * b, 2 * b + 2)
        x_l = torch.stack([c["image"] for c in labeled[pair]])
        y_l = torch.stack([c["label"] for c in labeled[pair]]).long()
        x_u = torch.stack([c["image"] for c in unlabeled[pair]])
        y_u = torch.stack([c["label"] for c in unlabeled[pair]])[:, 0] > 0
        terms = model(x_l, y_l, x_u, iteration)
        reference = gradient(sum(weights[n] * terms[n] for n in ("sup", "cr") if n in terms), params)
        for name, value in terms.items():
            g = gradient(weights[name] * value, params)
            row = sums.setdefault(name, {"weight": weights[name], "value": 0.0, "norm": 0.0, "cosine": 0.0})
            row["value"] += float(value.detach()) / batches
            norm, cosine = alignment(g, reference)
            row["norm"] += norm / batches
            row["cosine"] += cosine / batches
        with torch.no_grad():
            stats = pseudo_label_stats(model, x_u, y_u)
        for key, value in stats.items():
            labels[key] = labels.get(key, 0.0) + value / batches
    result = {"kind": "term_probe", "method": method, "num_labeled": num_labeled,
              "checkpoint": os.path.relpath(checkpoint) if checkpoint else "", "iteration": iteration,
              "batches": batches, "terms": sums, "unlabeled_pseudo_labels": labels,
              "command": display_command([sys.executable] + sys.argv), "commit": git_commit(),
              "hardware": hardware()}  # fmt: skip
    if output:
        write_json(result, os.path.dirname(output) or ".", os.path.splitext(os.path.basename(output))[0])
    return result


if __name__ == "__main__":
    fire.Fire(probe)
