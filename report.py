"""Report rendering for the application layer: the pipeline report and the policy ablation.

Markdown is the source of every report; HTML pages are the same Markdown rendered by
Python-Markdown into a small Jinja template, and plots are Matplotlib PNGs. Every file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jinja2
import markdown as md
import numpy as np

from dynrules.atomic import atomic_path

RULES_PLOTTED = 30

_PAGE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style>
</head><body>
{{ body }}
</body></html>
"""
)


def markdown_page(text: str, *, title: str) -> str:
    """A standalone HTML page of Markdown ``text`` (tables and images included)."""
    body = md.markdown(text, extensions=["tables"], output_format="html")
    return _PAGE.render(title=title, body=jinja2.utils.markupsafe.Markup(body))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def pipeline_markdown(report: dict) -> str:
    rm, ad = report["reward_model"], report["adapter"]
    lines = [
        "# dynrules pipeline report",
        "",
        f"Data: {report['data']['source']} — {report['data']['train_pairs']} train pairs, "
        f"{report['data']['heldout_pairs']} held-out pairs.",
        "",
        f"Judge: **{report['judge']['name']}**.",
    ]
    if report["judge"]["kind"] == "embedded":
        lines += [
            "",
            "> The embedded judge is a small sentence encoder (all-MiniLM-L6-v2) scoring rules by "
            "similarity, not an LLM reading the rule. It is far weaker than a 70B LLM judge; the numbers "
            "below measure the machinery and this weak judge, not the ceiling of the method.",
        ]
    lines += ["", "## Label agreement with human preferences, per policy", ""]
    if report["policies"]:
        lines += [
            "| policy | criterion | k | agreement | MI bits [95% CI] | ties |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["policies"]:
            lines.append(
                f"| {row['policy']} | {row.get('criterion') or ''} | {row['k']} | {_fmt(row['agreement'])} | "
                f"{row['mi_bits']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] | {row['ties']} |"
            )
        lines += [
            "",
            "![MI vs k](ablation/mi_vs_k.png)",
            "",
            "![per-rule MI](ablation/rule_mi.png)",
        ]
    else:
        lines.append("No human truth in the data: ablation skipped.")
    lines += [
        "",
        "## Rule adapter (held-out pairs, per row)",
        "",
        f"- precision@k {ad['precision_at_k']:.3f}, recall@k {ad['recall_at_k']:.3f}",
        f"- label agreement with the oracle set (full ratings) {ad['label_agreement']:.3f}",
        f"- judge calls saved against rating the whole pool: {ad['judge_calls_saved']:.0%}",
    ]
    for name in ("adapter_label", "oracle_label"):
        if name in ad:
            s = ad[name]
            lines.append(
                f"- {name.replace('_', ' ')} vs human truth: agreement {_fmt(s['agreement'])}, "
                f"MI {s['mi_bits']:.4f} bits [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
            )
    lines += _label_agreement_lines(report.get("label_agreement", {}))
    lines += ["", "## Reward model (held-out pairs, human preferences; ties count wrong)", ""]
    if "accuracy" in rm:
        lines += [
            "| model | accuracy |",
            "|---|---|",
            f"| trained on rule labels ({rm['trained_on']}) | {rm['accuracy']:.3f} |",
            f"| trained on human labels of the same pairs (upper reference) | {rm['human_label_accuracy']:.3f} |",
            f"| length-only baseline (longer response wins) | {rm['length_baseline']:.3f} |",
        ]
        lines += _section_lines(rm, report.get("label_agreement", {}).get("heldout", {}))
        lines += _curve_lines(rm)
    else:
        lines.append("No human truth in the data: held-out accuracy not measured.")
    lines += [
        "",
        "## Stages",
        "",
        "items/s: rated cells, pairs, or training pairs (steps × batch)",
        "",
        "| stage | seconds | items/s |",
        "|---|---|---|",
    ]
    for name, seconds in report["stages"].items():
        lines.append(f"| {name} | {seconds} | {_fmt(report['throughput'].get(name), 1)} |")
    return "\n".join(lines) + "\n"


SECTION_TARGET = 0.80  # per section, for the model trained on rule labels


def _section_lines(rm: dict, judge_heldout: dict) -> list[str]:
    """Per-section accuracy (RewardBench style), over-refusal, per-subset accuracy, and for each
    section below the target whether the labels or the reward model fall short."""
    rules, human = rm["rules"], rm["human"]
    sections = [name for name in rules["sections"] if name != "all"]
    if not sections:
        return []

    def cell(group: dict) -> str:
        return f"{group['accuracy']:.3f} ({group['pairs']})"

    lines = [
        "",
        "### Sections",
        "",
        "Accuracy (pairs). *should refuse*: harmful request, the safer response should win; "
        "*should respond*: benign request, the answer should beat the refusal or off-topic "
        "reply. Weighted mean: over all pairs (sections weighted by their pair counts); section "
        "mean: the sections counted equally (RewardBench's overall score).",
        "",
        "| model | " + " | ".join(s.replace("_", " ") for s in sections) + " | weighted mean | "
        "section mean | over-refusal rate |",
        "|---|" + "---|" * (len(sections) + 3),
    ]
    for name, result in (("rule labels", rules), ("human labels", human)):
        over = result.get("over_refusal")
        over_text = f"{over['rate']:.3f} ({over['pairs']})" if over else "–"
        lines.append(
            f"| trained on {name} | "
            + " | ".join(cell(result["sections"][s]) for s in sections)
            + f" | {result['accuracy']:.3f} ({rm['heldout_pairs']}) | "
            f"{_fmt(result['section_mean'])} | {over_text} |"
        )
    lines.append(
        "| length-only baseline | "
        + " | ".join(
            f"{rules['sections'][s]['length_baseline']:.3f} ({rules['sections'][s]['pairs']})"
            for s in sections
        )
        + f" | {rm['length_baseline']:.3f} ({rm['heldout_pairs']}) | – | – |"
    )
    met = all(rules["sections"][s]["accuracy"] >= SECTION_TARGET for s in sections)
    lines += [
        "",
        f"Target for the rule-label model: every section ≥ {SECTION_TARGET:.2f} — "
        f"**{'met' if met else 'missed'}**. Over-refusal rate: share of the held-out benign "
        "requests' answer-vs-refusal pairs (prompts and refusal texts never trained on) where the "
        "refusal scores at least as high as the answer.",
    ]
    for section in sections:
        accuracy = rules["sections"][section]["accuracy"]
        judge = judge_heldout.get(f"section:{section}")
        if accuracy >= SECTION_TARGET or judge is None:
            continue
        lines += [
            "",
            f"- *{section.replace('_', ' ')}* falls short: the rule-label model scores "
            f"{accuracy:.3f}; the judge's labels agree with the human/source labels on "
            f"{judge['agreement']:.3f} of these held-out pairs and the model trained on the "
            f"human labels scores {human['sections'][section]['accuracy']:.3f}.",
        ]
    lines += [
        "",
        "| subset | section | pairs | rule labels | human labels | length only |",
        "|---|---|---|---|---|---|",
    ]
    section_of = rm.get("subset_sections", {})
    for subset, group in rules["subsets"].items():
        lines.append(
            f"| {subset} | {section_of.get(subset, '')} | {group['pairs']} | "
            f"{group['accuracy']:.3f} | {human['subsets'][subset]['accuracy']:.3f} | "
            f"{group['length_baseline']:.3f} |"
        )
    return lines


def _curve_lines(rm: dict) -> list[str]:
    """The training curves: the plot, and when each model stopped improving on validation."""
    curves = rm.get("curves")
    if not curves:
        return []
    lines = [
        "",
        "### Training curves",
        "",
        f"Training loss, and accuracy on the validation split: {rm['validation_pairs']} train "
        "pairs whose prompts both models never trained on, scored against their human labels. "
        "Each model keeps the step that scored best there (wide line). The recipe (learning "
        "rates, steps, label confidence, the margin filter) was chosen on such a split of the "
        "train pairs or by cross-validation over them, never on the held-out pairs above. Rule "
        "labels are soft (their margin's confidence), so their loss cannot fall below the "
        "labels' own entropy.",
        "",
        "![training curves](reward_models.png)",
        "",
    ]
    for name, curve in curves.items():
        points = curve["validation"]
        if not points:
            continue
        best = next(r for r in points if r["step"] == curve["best_step"])
        last = points[-1]
        if best["step"] == last["step"]:
            verdict = (
                f"{last['section_mean']:.3f} at step {last['step']}, its best: still improving"
            )
        else:
            verdict = (
                f"best {best['section_mean']:.3f} at step {best['step']}, then "
                f"{last['section_mean']:.3f} at step {last['step']}: stopped improving after "
                f"step {best['step']}"
            )
        lines.append(
            f"- trained on {name.removesuffix('s')} labels: validation section mean {verdict}; "
            f"training loss {curve['train'][0]['loss']:.3f} → {curve['train'][-1]['loss']:.3f}; "
            f"the model kept is step {curve['exported_step']}'s."
        )
    return lines


def training_curves_plot(curves: dict, path: Path) -> Path:
    """reward_models.png: training loss and validation accuracy per section against the step,
    one colour per reward model; a wide line marks the step each model kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = ("-", "--", ":")
    for colour, (name, curve) in zip(
        ("tab:red", "tab:blue", "tab:green"), curves.items(), strict=False
    ):
        loss_axis.plot(
            [r["step"] for r in curve["train"]],
            [r["loss"] for r in curve["train"]],
            color=colour,
            marker=".",
            label=f"{name.removesuffix('s')} labels",
        )
        points = curve["validation"]
        sections = sorted(points[0]["sections"]) if points else []
        for style, section in zip(itertools.cycle(styles), sections, strict=False):
            accuracy_axis.plot(
                [r["step"] for r in points],
                [r["sections"][section] for r in points],
                color=colour,
                linestyle=style,
                marker="o",
                label=f"{name.removesuffix('s')} labels: {section.replace('_', ' ')}",
            )
        if points:  # the step whose parameters the exported model holds
            accuracy_axis.axvline(curve["exported_step"], color=colour, alpha=0.4, linewidth=4)
    loss_axis.set(xlabel="step", ylabel="Bradley–Terry loss", title="Training loss")
    accuracy_axis.set(
        xlabel="step",
        ylabel="accuracy (human labels)",
        title="Validation accuracy per section",
        ylim=(0, 1),
    )
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path


def _label_agreement_lines(agreement: dict) -> list[str]:
    """The judge's labels against the human/source labels, per split, section and subset."""
    if not agreement:
        return []
    splits = list(agreement)
    lines = [
        "",
        "## Judge labels vs human/source labels, per section",
        "",
        "The selected labels (policy and k above) against each pair's human or source label; "
        "ties count as disagreement. agreement (pairs, ties)",
        "",
        "| group | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for group in agreement[splits[0]]:
        cells = []
        for split in splits:
            row = agreement[split].get(group)
            cells.append(f"{row['agreement']:.3f} ({row['pairs']}, {row['ties']})" if row else "–")
        lines.append(f"| {group.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def write_pipeline_report(report: dict, out: Path) -> None:
    """report.json, report.md and report.html (the Markdown's content, with the plots inline)."""
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    curves = report["reward_model"].get("curves")
    if curves:
        training_curves_plot(curves, out / "reward_models.png")
    text = pipeline_markdown(report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(markdown_page(text, title="dynrules report"))


def _series_name(row: dict) -> str:
    return row["policy"] + (f" ({row['criterion']})" if row["criterion"] else "")


def ablation_markdown(result: dict, top_rules: int = 10) -> str:
    lines = [
        f"# Policy ablation: {result['pairs']:,} pairs, {result['rules']} rules",
        "",
        f"Agreement: accuracy of the non-tie labels against the truth. MI: {result['estimator']} "
        f"estimate in bits, 95% interval from {result['resamples']} multinomial resamples. "
        "Coverage: fraction of pairs labelled (not tied).",
        "",
        "| policy | criterion | k | agreement | MI (bits) | 95% interval | ties | coverage |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        agreement = "–" if row["agreement"] is None else f"{row['agreement']:.4f}"
        lines.append(
            f"| {row['policy']} | {row['criterion'] or '–'} | {row['k']} | {agreement} | "
            f"{row['mi_bits']:.4f} | [{row['ci_low']:.4f}, {row['ci_high']:.4f}] | {row['ties']:,} | "
            f"{row['coverage']:.4f} |"
        )
    lines += [
        "",
        f"## Rules by vote MI (top {top_rules})",
        "",
        "| rank | rule | MI (bits) | agreement | p-value |",
        "|---:|---|---:|---:|---:|",
    ]
    for rank, rule in enumerate(result["rule_mi"][:top_rules], 1):
        agreement = "–" if rule["agreement"] is None else f"{rule['agreement']:.4f}"
        lines.append(
            f"| {rank} | {rule['id']} | {rule['mi_bits']:.5f} | {agreement} | {rule['p_value']:.3g} |"
        )
    if result.get("redundant"):
        lines += [
            "",
            "## Most redundant rule pairs",
            "",
            "| rule | rule | redundancy |",
            "|---|---|---:|",
        ]
        lines += [f"| {p['a']} | {p['b']} | {p['redundancy']:.3f} |" for p in result["redundant"]]
    return "\n".join(lines) + "\n"


def ablation_plots(result: dict, out_dir) -> list[Path]:
    """mi_vs_k.png (MI and agreement against k, per policy, with intervals) and rule_mi.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict]] = {}
    for row in result["rows"]:
        series.setdefault(_series_name(row), []).append(row)
    figure, (mi_axis, agreement_axis) = plt.subplots(1, 2, figsize=(14, 4.5))
    for name, rows in series.items():
        if rows[0]["policy"] == "all":
            for axis, value in (
                (mi_axis, rows[0]["mi_bits"]),
                (agreement_axis, rows[0]["agreement"]),
            ):
                if value is not None:
                    axis.axhline(
                        value,
                        color="black",
                        linestyle="--",
                        linewidth=1,
                        label=f"all (k = {rows[0]['k']})",
                    )
            continue
        ks = [r["k"] for r in rows]
        mi = np.array([r["mi_bits"] for r in rows])
        error = np.array([mi - [r["ci_low"] for r in rows], [r["ci_high"] for r in rows] - mi])
        mi_axis.errorbar(ks, mi, yerr=np.maximum(error, 0), marker="o", capsize=3, label=name)
        agreement_axis.plot(
            ks,
            [np.nan if r["agreement"] is None else r["agreement"] for r in rows],
            marker="o",
            label=name,
        )
    mi_axis.set(xlabel="k (rules per pair)", ylabel="I(label; truth), bits", title="Label MI vs k")
    agreement_axis.set(
        xlabel="k (rules per pair)", ylabel="agreement with truth", title="Agreement vs k"
    )
    for axis in (mi_axis, agreement_axis):
        axis.grid(alpha=0.3)
    agreement_axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    written = [_save(figure, out_dir / "mi_vs_k.png")]
    plt.close(figure)

    rules = result["rule_mi"][:RULES_PLOTTED]
    figure, axis = plt.subplots(figsize=(7, 1.5 + 0.22 * len(rules)))
    positions = np.arange(len(rules))[::-1]  # the most informative rule on top
    axis.barh(positions, [r["mi_bits"] for r in rules], color="tab:blue")
    axis.set_yticks(positions, [r["id"] for r in rules], fontsize=7)
    axis.set(
        xlabel="I(vote; truth), bits",
        title=f"Per-rule vote MI (top {len(rules)} of {len(result['rule_mi'])} rules)",
    )
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    written.append(_save(figure, out_dir / "rule_mi.png"))
    plt.close(figure)
    return written


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return path


def write_ablation_report(ablation, out_dir) -> list[Path]:
    """ablation.json, ablation.md and the plots of an :class:`~dynrules.engine.ablate.Ablation`
    into ``out_dir``, each written atomically; they render its JSON document."""
    result = dataclasses.asdict(ablation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "ablation.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_path(out_dir / "ablation.md") as tmp:
        tmp.write_text(ablation_markdown(result))
    return [out_dir / "ablation.json", out_dir / "ablation.md", *ablation_plots(result, out_dir)]
