"""The comparison table and plot of `trace compare` (our version of the paper's table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trace_core.train.stats import curve_area, t_interval


def training_rows(history: list[dict]) -> list[dict]:
    """The rows of training steps (not the step-0 evaluation or `trace eval --write` rows)."""
    return [m for m in history if "effective_ratio" in m]


def eval_rows(history: list[dict]) -> list[dict]:
    """The run's own evaluations, step 0 (the untrained policy) included; not `trace eval --write` rows."""
    return [m for m in history if "eval/success" in m and "eval/source" not in m]


def _per_seed(history: list[dict]) -> dict[str, float]:
    evals, steps = eval_rows(history), training_rows(history)
    return {
        "initial_eval_success": next((m["eval/success"] for m in evals if m.get("step") == 0), np.nan),
        "final_eval_success": evals[-1]["eval/success"] if evals else np.nan,
        "success_area": curve_area([m["leaves_sampled"] for m in evals], [m["eval/success"] for m in evals]),
        "effective_ratio": float(np.mean([m["effective_ratio"] for m in steps])),
        "generated_tokens_per_step": float(np.mean([m["generated_tokens"] for m in steps])),
    }


def _summary(histories: list[list[dict]]) -> dict:
    """Mean, sample std and 95% t-interval over seeds of each per-seed number; per-step means of the rest."""
    seeds = [_per_seed(h) for h in histories]
    out: dict = {"seeds": len(histories), "per_seed": seeds}
    for key in seeds[0]:
        values = np.array([s[key] for s in seeds], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if not np.isnan(values).all() else np.nan
        out[f"{key}_std"] = float(np.nanstd(values, ddof=1)) if np.sum(~np.isnan(values)) > 1 else np.nan
        out[f"{key}_ci"] = t_interval(values)
    steps = [m for h in histories for m in training_rows(h)]
    out["leaves_per_step"] = float(np.mean([m["leaves"] for m in steps]))
    out["dedup_ratio"] = float(np.mean([m["dedup_ratio"] for m in steps]))
    out["seconds_per_step"] = float(np.mean([sum(v for k, v in m.items() if k.startswith("time/")) for m in steps]))
    return out


def paired_differences(summary: dict, baseline: str) -> dict[str, dict[str, dict]]:
    """Per variant: the per-seed difference to `baseline` (same seeds, in order) of final success, success
    area and effective ratio, with its mean and 95% t-interval."""
    base = summary[baseline]["per_seed"]
    out: dict[str, dict[str, dict]] = {}
    for variant, s in summary.items():
        if variant == baseline or s["seeds"] != summary[baseline]["seeds"]:
            continue
        out[variant] = {}
        for key in ("final_eval_success", "success_area", "effective_ratio"):
            diff = [a[key] - b[key] for a, b in zip(s["per_seed"], base)]
            out[variant][key] = {"per_seed": diff, "mean": float(np.mean(diff)), "ci": t_interval(diff)}
    return out


def _ci(s: dict, key: str) -> str:
    low, high = s[f"{key}_ci"]
    interval = "" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]"
    return f"{s[key]:.3f}{interval}"


def write_comparison(
    runs: dict[str, list[list[dict]]],
    cfg,
    out: Path,
    *,
    name: str = "comparison",
    label: str = "mode",
    budget: str | None = None,
    baseline: str | None = "uniform",
) -> dict:
    """runs[label] = one metrics history per seed (the same seeds for every label). Writes <name>.md / .json /
    .png (and <name>_paired.json) under `out`: per label the mean and 95% interval over seeds of final held-out success, the success
    curve's area, the effective ratio and generated tokens, and the paired differences to `baseline` (when it
    is one of the labels). `budget`: the header's budget line (default: the config's)."""
    summary = {mode: _summary(histories) for mode, histories in runs.items()}
    if budget is None:
        budget = (
            f"Budget: {cfg.allocation.leaves_per_step} leaves per step ({cfg.allocation.roots} roots x "
            f"(1 + {cfg.allocation.continuations_per_root}))"
        )
    lines = [
        f"{budget}, {cfg.steps} steps, env {cfg.env.name}, model {cfg.model.name}.",
        "",
        (
            f"| {label} | step-0 eval success | final eval success | success curve area | effective ratio | leaves/step "
            "| generated tokens/step | leaf-path / packed tokens | s/step |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {s['initial_eval_success']:.3f} | {_ci(s, 'final_eval_success')} | {_ci(s, 'success_area')} "
            f"| {_ci(s, 'effective_ratio')} | {s['leaves_per_step']:.0f} | {s['generated_tokens_per_step']:.0f} "
            f"| {s['dedup_ratio']:.2f} | {s['seconds_per_step']:.2f} |"
        )
    counts = sorted({s["seeds"] for s in summary.values()})
    if len(counts) == 1:
        lines.append(f"\n(mean ± std over {counts[0]} seed{'s' if counts[0] != 1 else ''}; brackets: 95% t-interval)")
    else:
        per_mode = ", ".join(f"{mode} {s['seeds']}" for mode, s in summary.items())
        lines.append(f"\n(mean ± std over the seeds of each mode: {per_mode}; brackets: 95% t-interval)")
    differences = paired_differences(summary, baseline) if baseline in summary else {}
    if differences:
        lines += [
            "",
            f"Paired differences to {baseline} (same seeds), mean [95% t-interval]:",
            "",
            f"| {label} | final success | success curve area | effective ratio |",
            "|---|---|---|---|",
        ]
        for variant, d in differences.items():
            cells = []
            for key in ("final_eval_success", "success_area", "effective_ratio"):
                low, high = d[key]["ci"]
                cells.append(f"{d[key]['mean']:+.3f}" + ("" if np.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    if differences:
        (out / f"{name}_paired.json").write_text(json.dumps(differences, indent=2))
    plot_runs(runs, out / f"{name}.png")
    print("\n".join(lines))
    return summary


def plot_runs(runs: dict[str, list[list[dict]]], path: Path) -> None:
    """Held-out success and effective ratio against leaves sampled; runs[label] = histories (seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_success, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, histories in runs.items():
        steps = [training_rows(h) for h in histories]
        x = np.mean([[m["leaves_sampled"] for m in h] for h in steps], axis=0)
        ratio = np.mean([[m["effective_ratio"] for m in h] for h in steps], axis=0)
        ax_ratio.plot(x, ratio, label=mode)
        evals = [[(m["leaves_sampled"], m["eval/success"]) for m in eval_rows(h)] for h in histories]
        if evals and evals[0]:
            ex = np.mean([[p[0] for p in e] for e in evals], axis=0)
            ey = np.mean([[p[1] for p in e] for e in evals], axis=0)
            ax_success.plot(ex, ey, marker="o", label=mode)
    ax_success.set(xlabel="leaves sampled", ylabel="held-out success", title="success (mean over seeds)")
    ax_ratio.set(xlabel="leaves sampled", ylabel="effective ratio", title="prompts with mixed outcomes")
    for ax in (ax_success, ax_ratio):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
