"""The comparison table and plot of `trace compare` (our version of the paper's table)."""

from __future__ import annotations

import json
import warnings
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
        "oracle_tokens_per_step": float(np.mean([m.get("oracle_tokens", 0) for m in steps])),  # outside the budget
        **{f"predictor_{key}_{i + 1}": value for key in CALIBRATION for i, value in enumerate(_thirds(steps, key))},
    }


# predictor/<key>, when logged (head_*: the learned head scored on an oracle run's nodes)
CALIBRATION = ("auc_mixed", "head_auc_mixed", "brier", "brier_constant", "head_brier", "head_brier_constant")
THIRDS = 3  # the calibration table splits training into this many equal windows of steps


def _thirds(steps: list[dict], key: str) -> list[float]:
    """Mean of predictor/<key> over each third of the training steps (NaN where no step of it logged it)."""
    values = np.array([float(m.get(f"predictor/{key}", np.nan)) for m in steps])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window without the metric: NaN
        return [float(np.nanmean(part)) if part.size else np.nan for part in np.array_split(values, THIRDS)]


def _summary(histories: list[list[dict]]) -> dict:
    """Mean, sample std and 95% t-interval over seeds of each per-seed number; per-step means of the rest."""
    seeds = [_per_seed(h) for h in histories]
    out: dict = {"seeds": len(histories), "per_seed": seeds}
    for key in seeds[0]:
        values = np.array([s[key] for s in seeds], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if not np.isnan(values).all() else np.nan
        out[f"{key}_seeds"] = int(np.sum(~np.isnan(values)))  # seeds that had it (AUC needs both classes)
        out[f"{key}_std"] = float(np.nanstd(values, ddof=1)) if np.sum(~np.isnan(values)) > 1 else np.nan
        out[f"{key}_ci"] = t_interval(values)
    steps = [m for h in histories for m in training_rows(h)]
    out["leaves_per_step"] = float(np.mean([m["leaves"] for m in steps]))
    out["dedup_ratio"] = float(np.mean([m["dedup_ratio"] for m in steps]))
    out["seconds_per_step"] = float(np.mean([sum(v for k, v in m.items() if k.startswith("time/")) for m in steps]))
    return out


def paired_differences(summary: dict, baseline: str) -> dict[str, dict[str, dict]]:
    """Per variant: the per-seed difference to `baseline` of final success, success area and effective ratio,
    with its mean and 95% t-interval. Seeds pair by their ids when the summary has them (`seed_ids`: only the
    seeds both rows ran), else by position when both rows have the same number of seeds."""
    base = summary[baseline]
    out: dict[str, dict[str, dict]] = {}
    for variant, s in summary.items():
        if variant == baseline:
            continue
        if "seed_ids" in s and "seed_ids" in base:
            common = [seed for seed in s["seed_ids"] if seed in base["seed_ids"]]
            pairs = [
                (s["per_seed"][s["seed_ids"].index(k)], base["per_seed"][base["seed_ids"].index(k)]) for k in common
            ]
        elif s["seeds"] == base["seeds"]:
            common, pairs = list(range(s["seeds"])), list(zip(s["per_seed"], base["per_seed"]))
        else:
            continue
        if not pairs:
            continue
        out[variant] = {"seeds": common}
        for key in ("final_eval_success", "success_area", "effective_ratio"):
            diff = [a[key] - b[key] for a, b in pairs]
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
    seeds: dict[str, list[int]] | None = None,
) -> dict:
    """runs[label] = one metrics history per seed (the same seeds for every label). Writes <name>.md / .json /
    .png (and <name>_paired.json) under `out`: per label the mean and 95% interval over seeds of final held-out success, the success
    curve's area, the effective ratio and generated tokens, and the paired differences to `baseline` (when it
    is one of the labels). `budget`: the header's budget line (default: the config's)."""
    summary = {mode: _summary(histories) for mode, histories in runs.items()}
    for mode, ids in (seeds or {}).items():  # which seeds each row ran (pairs differences by seed)
        summary[mode]["seed_ids"] = list(ids)
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
        seeds = f"{counts[0]} seed{'s' if counts[0] != 1 else ''}"
    else:
        seeds = "the seeds of each row: " + ", ".join(f"{mode} {s['seeds']}" for mode, s in summary.items())
    lines.append(
        f"\nMean over {seeds}; brackets: 95% t-interval over seeds (none with one seed; sample std in {name}.json). "
        "Effective ratio and tokens: per-step means over training. Success curve area: the area under held-out "
        "success against leaves sampled, step 0 included, divided by the leaves (a mean success over training)."
    )
    oracle = {mode: s for mode, s in summary.items() if s["oracle_tokens_per_step"] > 0}
    if oracle:
        lines.append(
            "Oracle rows also generated "
            + ", ".join(f"{mode} {s['oracle_tokens_per_step']:.0f}" for mode, s in oracle.items())
            + " tokens per step for their Monte-Carlo predictions, outside the budget and never trained on."
        )
    lines += _calibration_table(summary, label)
    differences = paired_differences(summary, baseline) if baseline in summary else {}
    if differences:
        lines += [
            "",
            f"Paired differences to {baseline} (same seeds), mean [95% t-interval]:",
            "",
            f"| {label} | seeds | final success | success curve area | effective ratio |",
            "|---|---|---|---|---|",
        ]
        for variant, d in differences.items():
            cells = [str(len(d["seeds"]))]
            for key in ("final_eval_success", "success_area", "effective_ratio"):
                low, high = d[key]["ci"]
                cells.append(f"{d[key]['mean']:+.3f}" + ("" if np.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"))
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    written = [out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"]
    written[0].write_text("\n".join(lines) + "\n")
    written[1].write_text(json.dumps(summary, indent=2))
    if differences:
        written.append(out / f"{name}_paired.json")
        written[-1].write_text(json.dumps(differences, indent=2))
    plot_runs(runs, written[2])
    print("\n".join(lines))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return summary


def _calibration_table(summary: dict, label: str) -> list[str]:
    """Markdown lines: the predictor's AUC of "subtree turns out mixed" and Brier score per third of training,
    for the rows whose predictions were logged (informed steps of predictor-driven modes)."""

    def thirds(s: dict, key: str) -> np.ndarray:
        return np.array([s.get(f"predictor_{key}_{i + 1}", np.nan) for i in range(THIRDS)], dtype=np.float64)

    def cell(values: np.ndarray) -> str:
        return " / ".join("-" if np.isnan(v) else f"{v:.2f}" for v in values)

    def skill(s: dict, prefix: str = "") -> np.ndarray:  # Brier skill score: 1 - Brier / Brier of the constant
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 - thirds(s, f"{prefix}brier") / thirds(s, f"{prefix}brier_constant")

    rows = [(mode, s) for mode, s in summary.items() if not np.isnan(thirds(s, "brier")).all()]
    if not rows:
        return []
    lines = [
        "",
        (
            "Predictor calibration per third of training (first / middle / last), mean over seeds. AUC: how well the "
            "predicted contrast ranks the roots and anchors whose subtree turned out mixed (0.5 = chance; it also "
            "rewards what the allocation knows without the predictor, e.g. that a prompt with more rollouts is more "
            "often mixed). Brier skill: 1 - Brier score of Vhat against the subtree success rates / Brier score of "
            "the best constant for that step (0 = no better than knowing the step's mean success). Oracle rows: the "
            "Monte-Carlo predictions, and the learned head scored on the same nodes."
        ),
        "",
        f"| {label} | AUC | Brier skill | learned head's AUC (oracle rows) | learned head's Brier skill (oracle rows) |",
        "|---|---|---|---|---|",
    ]
    for mode, s in rows:
        lines.append(
            f"| {mode} | {cell(thirds(s, 'auc_mixed'))} | {cell(skill(s))} | {cell(thirds(s, 'head_auc_mixed'))} "
            f"| {cell(skill(s, 'head_'))} |"
        )
    return lines


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average of a 1-D series (NaN-aware: NaNs are skipped); `window` points wide."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    ok = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _series(histories: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(leaves sampled [S], per-step mean over seeds [S]) of a training metric; NaN where a step lacks it."""
    steps = [training_rows(h) for h in histories]
    length = min(len(h) for h in steps)
    x = np.mean([[m["leaves_sampled"] for m in h[:length]] for h in steps], axis=0)
    y = np.array([[float(m.get(key, np.nan)) for m in h[:length]] for h in steps])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no seed logged it: NaN, drawn as a gap
        return x, np.nanmean(y, axis=0) if y.size else y


def reference_levels(runs: dict[str, list[list[dict]]]) -> dict[str, float]:
    """`reference/<policy>` values the runs logged with their step-0 evaluation (same eval tasks in every run)."""
    for histories in runs.values():
        for history in histories:
            for row in history:
                levels = {k.removeprefix("reference/"): v for k, v in row.items() if k.startswith("reference/")}
                if levels:
                    return levels
    return {}


def plot_runs(runs: dict[str, list[list[dict]]], path: Path, *, title: str | None = None) -> None:
    """Held-out success, effective ratio and (when logged) the predictor's AUC against leaves sampled.

    runs[label] = one metrics history per seed. Success: the mean over seeds at each evaluation, step 0
    included, with a 95% t-interval band when there are several seeds, and the scripted policies' levels the
    env reports (dashed). Per-step metrics: the raw per-step mean faint, a moving average solid. `title`
    says what the figure is (default: the number of seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_auc = any("predictor/auc_mixed" in m for hs in runs.values() for h in hs for m in h)
    fig, axes = plt.subplots(1, 3 if has_auc else 2, figsize=(16 if has_auc else 11, 4.2))
    ax_success, ax_ratio = axes[0], axes[1]
    seeds = sorted({len(h) for h in runs.values()})
    for index, (label, histories) in enumerate(runs.items()):
        color = f"C{index}"
        evals = [eval_rows(h) for h in histories]
        length = min(len(e) for e in evals)
        if length:
            ex = np.mean([[m["leaves_sampled"] for m in e[:length]] for e in evals], axis=0)
            ey = np.array([[m["eval/success"] for m in e[:length]] for e in evals])
            ax_success.plot(ex, ey.mean(axis=0), marker="o", color=color, label=label)
            if len(histories) > 1:
                bands = np.array([t_interval(ey[:, j]) for j in range(length)])
                ax_success.fill_between(ex, bands[:, 0], bands[:, 1], color=color, alpha=0.15)
        x, ratio = _series(histories, "effective_ratio")
        window = max(len(x) // 20, 1)
        ax_ratio.plot(x, ratio, color=color, alpha=0.2, linewidth=0.8)
        ax_ratio.plot(x, smooth(ratio, window), color=color, label=label)
        if has_auc:
            x, value = _series(histories, "predictor/auc_mixed")
            if not np.isnan(value).all():
                axes[2].plot(x, value, color=color, alpha=0.2, linewidth=0.8)
                axes[2].plot(x, smooth(value, window), color=color, label=label)
            x, head = _series(histories, "predictor/head_auc_mixed")
            if not np.isnan(head).all():
                axes[2].plot(x, smooth(head, window), color=color, linestyle=":", label=f"{label}: learned head")
    for index, (name, level) in enumerate(reference_levels(runs).items()):
        ax_success.axhline(level, color="gray", linestyle=["--", ":", "-."][index % 3], linewidth=1, label=name)
    many = "s" if seeds != [1] else ""
    ax_success.set(
        xlabel="leaves sampled",
        ylabel="held-out success",
        ylim=(0, 1),
        title="held-out success" + (" (band: 95% t-interval)" if seeds != [1] else ""),
    )
    ax_ratio.set(xlabel="leaves sampled", ylabel="effective ratio", ylim=(0, 1), title="prompts with mixed outcomes")
    if has_auc:
        axes[2].axhline(0.5, color="gray", linestyle="--", linewidth=1)
        axes[2].set(
            xlabel="leaves sampled", ylabel="AUC", ylim=(0, 1), title='predictor: AUC of "subtree turns out mixed"'
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    counts = ", ".join(map(str, seeds))
    fig.suptitle(title or f"mean over {counts} seed{many} per curve; per-step curves: raw (faint) and moving average")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
