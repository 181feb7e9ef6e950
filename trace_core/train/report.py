"""The comparison table and plot of `trace compare` (our version of the paper's table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def training_rows(history: list[dict]) -> list[dict]:
    """The rows of training steps (not the step-0 evaluation or `trace eval --write` rows)."""
    return [m for m in history if "effective_ratio" in m]


def _summary(histories: list[list[dict]]) -> dict[str, float]:
    finals = [next((m["eval/success"] for m in reversed(h) if "eval/success" in m), np.nan) for h in histories]
    initial = [
        next((m["eval/success"] for m in h if m.get("step") == 0 and "eval/success" in m), np.nan) for h in histories
    ]
    histories = [training_rows(h) for h in histories]
    ratio = [np.mean([m["effective_ratio"] for m in h]) for h in histories]
    return {
        "seeds": len(histories),
        "initial_eval_success": float(np.mean(initial)),
        "final_eval_success": float(np.mean(finals)),
        "final_eval_success_std": float(np.std(finals)),
        "effective_ratio": float(np.mean(ratio)),
        "effective_ratio_std": float(np.std(ratio)),
        "leaves_per_step": float(np.mean([m["leaves"] for h in histories for m in h])),
        "generated_tokens_per_step": float(np.mean([m["generated_tokens"] for h in histories for m in h])),
        "dedup_ratio": float(np.mean([m["dedup_ratio"] for h in histories for m in h])),
        "seconds_per_step": float(
            np.mean([sum(v for k, v in m.items() if k.startswith("time/")) for h in histories for m in h])
        ),
    }


def write_comparison(
    runs: dict[str, list[list[dict]]],
    cfg,
    out: Path,
    *,
    name: str = "comparison",
    label: str = "mode",
    budget: str | None = None,
) -> dict:
    """runs[label] = one metrics history per seed. Writes <name>.md / .json / .png under `out`.
    `budget`: the header's budget line (default: the config's; an ablation of budgets says they vary)."""
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
            f"| {label} | step-0 eval success | final eval success | effective ratio | leaves/step | generated tokens/step "
            "| leaf-path / packed tokens | s/step |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {s['initial_eval_success']:.3f} | {s['final_eval_success']:.3f} ± {s['final_eval_success_std']:.3f} | "
            f"{s['effective_ratio']:.3f} ± {s['effective_ratio_std']:.3f} | {s['leaves_per_step']:.0f} | "
            f"{s['generated_tokens_per_step']:.0f} | {s['dedup_ratio']:.2f} | {s['seconds_per_step']:.2f} |"
        )
    counts = sorted({s["seeds"] for s in summary.values()})
    if len(counts) == 1:
        lines.append(f"\n(mean ± std over {counts[0]} seed{'s' if counts[0] != 1 else ''})")
    else:
        per_mode = ", ".join(f"{mode} {s['seeds']}" for mode, s in summary.items())
        lines.append(f"\n(mean ± std over the seeds of each mode: {per_mode})")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
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
        # the training run's own evaluations, step 0 (the untrained policy) included; not `trace eval --write` rows
        evals = [
            [(m["leaves_sampled"], m["eval/success"]) for m in h if "eval/success" in m and "eval/source" not in m]
            for h in histories
        ]
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
