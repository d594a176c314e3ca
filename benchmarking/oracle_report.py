"""The oracle part of ``docs/RESULTS.md``: the authors' released code run on this benchmark's protocol
(:mod:`benchmarking.oracle`), paired per test case with its own supervised-only run and with our plug-ins, and what
that says about a semi-supervised method that does not separate from its reference here.

Two explanations are told apart. If the authors' code gains over its own supervised run where our plug-in does not,
our plug-in is suspect; if their code does not gain either, the protocol (its length, data size, the weight of the
unlabeled term) is why. One seed decides nothing on its own: the statement names how many seeds it rests on.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarking.report import FAILURE_DICE, Record, failure_count, group_records, paired_result, per_case, verdict
from benchmarking.statistics import format_interval
from bundle.methods.presets import reference_of

ByMethod = Dict[Tuple[str, int, str], Dict[int, Tuple[str, Record]]]


def _by_method(records: Sequence[Tuple[str, Record]]) -> ByMethod:
    """Oracle records keyed by ``(protocol, K, method)``, then seed."""
    groups: ByMethod = {}
    for name, record in records:
        key = (record["protocol"], record["num_labeled"], record["method"])
        groups.setdefault(key, {})[record["seed"]] = (name, record)
    return groups


def _scores(by_seed: Dict[int, Tuple[str, Record]], seeds: Sequence[int]) -> Dict[int, Dict[str, float]]:
    return {seed: values for seed, values in per_case(by_seed).items() if seed in seeds}


def _row(label: str, run: Dict[int, Dict[str, float]], other_label: str, other: Dict[int, Dict[str, float]]) -> str:
    """One table row: ``label`` against ``other_label`` on their common seeds, paired per case."""
    result = paired_result(run, other)
    kept = result["failures"]
    mean = 100 * sum(sum(v.values()) / len(v) for v in run.values()) / len(run)
    kept_cell = "–" if kept is None else f"{format_interval(kept, 100)} ({kept['pairs']}/{kept['of']})"
    return (f"| {label} | {', '.join(map(str, sorted(run)))} | {mean:.2f} | {failure_count(run)} | {other_label} "
            f"| {format_interval(result, 100)} | {result['wins']}/{result['cases']} | {kept_cell} "
            f"| {verdict(result)} |")  # fmt: skip


def oracle_finding(oracle_gain: Dict[str, Any], our_gain: Optional[Dict[str, Any]], seeds: int) -> str:
    """The sentence the report states: which explanation the oracle's paired gain over its own supervised run
    (``oracle_gain``) supports, given our plug-in's gain over its reference on the same seeds (``our_gain``)."""
    rest = f" ({seeds} seed{'s' if seeds > 1 else ''}; more seeds would firm this up)" if seeds < 3 else ""
    theirs, ours = verdict(oracle_gain), None if our_gain is None else verdict(our_gain)
    if theirs == "above" and ours != "above":
        return ("The authors' code gains over its own supervised run where our plug-in does not: this points to a "
                f"defect in our plug-in, not to the protocol{rest}.")  # fmt: skip
    if theirs == "above":
        return f"Both the authors' code and our plug-in gain over their supervised runs here{rest}."
    if ours == "above":
        return (f"Our plug-in gains over its reference while the authors' code is {theirs} from its own: the "
                f"plug-in is not the weaker of the two{rest}.")  # fmt: skip
    return ("The authors' code does not gain over its own supervised run either (" + theirs + "): this supports the "
            "protocol explanation (too short a run, too weak an unlabeled term at this data size), not a defect of "
            f"our plug-in{rest}.")  # fmt: skip


#: the variant of our runs whose V-Nets start from PyTorch's default weights, as the authors' V-Net does
#: (``weight_init`` ``torch_default``, fp32 as their code): the run that differs from theirs least.
INIT_VARIANT = "fp32_torch_init"


def _relation(result: Dict[str, Any]) -> str:
    """``above`` / ``below`` / ``not separable from``: the verdict of a paired result, as a preposition."""
    return "not separable from" if verdict(result) == "not separable" else verdict(result)


def pipeline_finding(gaps: Dict[str, Tuple[str, Dict[str, Any]]]) -> str:
    """What the authors' supervised-only run against ours says (``gaps``: our variant -> (label, paired result of
    theirs minus ours)): nothing when our Kaiming-initialised runs are not separable from theirs; else the gap, and
    whether our run with the authors' initialisation (:data:`INIT_VARIANT`) closes it."""
    kaiming = gaps.get("fp32") or gaps.get("")
    if kaiming is None or verdict(kaiming[1]) == "not separable":
        return ""
    text = (f" The authors' supervised-only run is {verdict(kaiming[1])} {kaiming[0]} "
            f"({format_interval(kaiming[1], 100)}): the two pipelines differ in what every single-V-Net method shares "
            "(sampling, augmentation, supervised loss, network and its initialisation).")  # fmt: skip
    if INIT_VARIANT not in gaps:
        return text + " Which of these it is has not been measured."
    label, result = gaps[INIT_VARIANT]
    text += (f" With our V-Net initialised as their code leaves it (PyTorch's default, `weight_init torch_default`), "
             f"theirs is {_relation(result)} {label} ({format_interval(result, 100)})")  # fmt: skip
    if verdict(result) == "not separable":
        return (
            text
            + ": the initialisation accounts for the gap within this interval (what remains is at most its upper end)."
        )
    return text + ": the initialisation explains part of the gap at most; the rest has not been measured."


def oracle_sections(
    oracle_records: Sequence[Tuple[str, Record]], accuracy_records: Sequence[Tuple[str, Record]]
) -> List[str]:
    """The ``## Oracle`` section: per protocol and K, the authors' semi-supervised run against their supervised one,
    ours against ours on the same seeds, and theirs against ours, each paired per test case; then the finding."""
    oracle = _by_method(oracle_records)
    if not oracle:
        return []
    ours = group_records(accuracy_records)
    lines = [
        "## Oracle: the authors' code on this protocol",
        "",
        "The authors' released training script (`benchmarking/oracle.py`: their repository at a pinned commit, patched",
        "only to run on CPU with this protocol's data, iterations, patch, batch and LR schedule) trained on the same",
        "first 60 cases with the same K labeled, and scored by our evaluation on the same 20 test cases. Their",
        "semi-supervised run is paired per case with their own supervised-only run, ours with our reference on the",
        "same seeds (our default variant), and theirs with ours. Columns as in the accuracy tables (failure: Dice <"
        f" {100 * FAILURE_DICE:.0f}).",
        "",
    ]
    findings: List[str] = []
    for protocol, k, method in sorted(key for key in oracle if reference_of(key[2]) is not None):
        theirs = oracle[(protocol, k, method)]
        reference = reference_of(method)
        their_reference = oracle.get((protocol, k, "supervised"))
        lines += [f"### {method}, `{protocol}` protocol, K = {k}", "",
                  "| run | seeds | Dice | failures | compared with | Δ Dice [95 % CI] | wins | where neither fails "
                  "| verdict |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        seeds = sorted(theirs)
        oracle_gain = our_gain = None
        if their_reference and set(their_reference) & set(seeds):
            common = sorted(set(their_reference) & set(seeds))
            run, ref = _scores(theirs, common), _scores(their_reference, common)
            lines.append(_row(f"authors' {method}", run, "authors' supervised", ref))
            oracle_gain = paired_result(run, ref)
        for variant in ("", INIT_VARIANT):
            mine, my_reference = ours.get((protocol, k, method, variant)), ours.get((protocol, k, reference, variant))
            tag = f" [{variant}]" if variant else ""
            if mine and my_reference and set(mine) & set(my_reference) & set(seeds):
                common = sorted(set(mine) & set(my_reference) & set(seeds))
                run = _scores(mine, common)
                lines.append(_row(f"our {method}{tag}", run, f"our {reference}{tag}", _scores(my_reference, common)))
                our_gain = paired_result(run, _scores(my_reference, common))  # the init variant, when run, last
            if mine and set(mine) & set(seeds):
                common = sorted(set(mine) & set(seeds))
                lines.append(
                    _row(f"authors' {method}", _scores(theirs, common), f"our {method}{tag}", _scores(mine, common))
                )
        pipeline_gaps: Dict[str, Tuple[str, Dict[str, Any]]] = {}
        for variant in ("", "fp32", INIT_VARIANT):  # the authors' code trains in fp32: our fp32 runs pair closest
            ours_ref = ours.get((protocol, k, reference, variant))
            if their_reference and ours_ref and set(their_reference) & set(ours_ref):
                common = sorted(set(their_reference) & set(ours_ref))
                label = f"our {reference}" + (f" [{variant}]" if variant else "")
                their_scores, our_scores = _scores(their_reference, common), _scores(ours_ref, common)
                lines.append(_row("authors' supervised", their_scores, label, our_scores))
                pipeline_gaps[variant] = (label, paired_result(their_scores, our_scores))
        init_gain = None
        kaiming_ref, init_ref = ours.get((protocol, k, reference, "fp32")), ours.get(
            (protocol, k, reference, INIT_VARIANT)
        )
        if kaiming_ref and init_ref and set(kaiming_ref) & set(init_ref):
            common = sorted(set(kaiming_ref) & set(init_ref))
            run, other = _scores(init_ref, common), _scores(kaiming_ref, common)
            lines.append(_row(f"our {reference} [{INIT_VARIANT}]", run, f"our {reference} [fp32]", other))
            init_gain = (f"our {reference} [{INIT_VARIANT}]", f"our {reference} [fp32]", paired_result(run, other))
        lines.append("")
        if oracle_gain is not None:
            finding = oracle_finding(oracle_gain, our_gain, len(oracle_gain["differences"]))
            finding += pipeline_finding(pipeline_gaps)
            if init_gain is not None:
                label, other, result = init_gain
                seeds_used = len(result["differences"])
                finding += (
                    f" On its own, the initialisation puts {label} {_relation(result)} {other} "
                    f"({format_interval(result, 100)}, {seeds_used} seed{'s' if seeds_used > 1 else ''})."
                )
            findings.append(f"{method}, K = {k}: {finding}")
            lines += [f"**Finding.** {finding}", ""]
    for name, record in oracle_records:
        lines.append(f"- `{name}`: commit {record['commit']}, {record['hardware']}, seed {record['seed']}, their "
                     f"{record['reference']['repository']} at {record['reference']['commit'][:7]} "
                     f"(`{record['reference']['script']}`), {record['seconds_per_iteration']:.2f} s/it; command: "
                     f"`{record['command']}`" + (f" ({record['notes']})" if record.get("notes") else ""))  # fmt: skip
    lines.append("")
    return lines
