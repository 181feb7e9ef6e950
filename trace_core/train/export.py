"""`trace export RUN_DIR OUT_DIR`: a run's policy in Hugging Face format, for `AutoModelForCausalLM` and vLLM.

    OUT_DIR/config.json, model.safetensors, generation_config.json   the policy (full, or LoRA merged in)
    OUT_DIR/adapter_config.json, adapter_model.safetensors          a LoRA run without --merge-lora
    OUT_DIR/tokenizer.json, tokenizer_config.json, ...              its tokenizer
    OUT_DIR/trace_export.json                                        where it came from (run, checkpoint, step)

The weights come from the run's checkpoint through `Trainer.for_evaluation` (the one loader of checkpoints), so
the export is exactly what `trace eval` evaluates. The export is written to a temporary folder beside OUT_DIR
and renamed into place once complete: a failed export leaves nothing half-written, and `--overwrite` replaces
a previous export only when the new one is whole. Nothing is written into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from trace_core.train import checkpoint as ckpt
from trace_core.train.config_loader import ConfigError

log = logging.getLogger("trace_core.train.export")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# what an earlier export leaves (one of them): --overwrite replaces such a folder and nothing else
EXPORT_MARKERS = ("config.json", "adapter_config.json", "trace_export.json")
# settings that do not change the weights: the CPU wherever the run trained, no KV cache to speak of, and no
# frozen reference copy of the policy (kl_coef > 0 would hold the model twice)
LOAD_OVERRIDES = {
    "model": {"device": "cpu", "attention_backend": "auto"},
    "generation": {"num_pages": 1},
    "optim": {"kl_coef": 0.0},
}


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    merge_lora: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
) -> dict:
    """Write the policy of `run_dir`'s checkpoint (its newest intact one, or the one of `step`) to `out_dir`.

    merge_lora: a LoRA run's adapters merged into the base weights (a plain model); default: the adapters alone
    (peft's format, which names the base model). dtype: of the saved weights; "auto" is the run's model.dtype
    (adapters are saved as trained). Returns what trace_export.json records."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError("--dtype", f"{dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory (no config.yaml)")
    check_out_dir(run_dir, out_dir, overwrite=overwrite)
    path = checkpoint_path(run_dir, step)

    from trace_core.model.lora import is_lora
    from trace_core.model.policy import DTYPES
    from trace_core.train.trainer import Trainer

    trainer, _ = Trainer.for_evaluation(path, overrides=LOAD_OVERRIDES)
    model, lora = trainer.model, is_lora(trainer.model)
    if merge_lora and not lora:
        raise ConfigError("--merge-lora", f"{run_dir} trained no LoRA adapters (model.lora.enabled is false)")
    target = DTYPES[trainer.cfg.model.dtype if dtype == "auto" else dtype]
    # the base an adapter-only export names (peft's adapter_config.json): the Hub id or directory it loaded from
    base_name = model.peft_config["default"].base_model_name_or_path if lora else None
    if lora and merge_lora:
        model = model.merge_and_unload()  # W + (alpha / r) B A into each target layer; a plain transformers model
    if not lora or merge_lora:
        model = model.to(target)
    what = "LoRA adapters" if lora and not merge_lora else "merged model" if lora else "full model"
    record = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": path.name,
        "step": trainer.step,
        "model.name": trainer.cfg.model.name,
        "content": what,
        "dtype": str(target).removeprefix("torch.") if not lora or merge_lora else "as trained",
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        trainer.policy.tokenizer.save_pretrained(tmp)
        (tmp / "trace_export.json").write_text(json.dumps(record, indent=2) + "\n")
        _replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if lora and not merge_lora and not base_name:
        log.warning(
            "export: %s holds LoRA adapters of a model built in code (%s), which from_pretrained cannot find by "
            "name; use --merge-lora for a model that loads on its own",
            out_dir,
            trainer.cfg.model.name,
        )
    return record


def check_out_dir(run_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """ConfigError naming OUT_DIR unless the export may go there: not in (or above) the run directory, and empty
    or new, or (with --overwrite) an earlier export."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or run in out.parents or out in run.parents:
        raise ConfigError("OUT_DIR", f"{out_dir} is inside (or holds) the run directory {run_dir}; export elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError("OUT_DIR", f"{out_dir} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                "OUT_DIR",
                f"{out_dir} already holds files; choose an empty or new folder, or --overwrite an earlier export",
            )
        if not any((out / marker).is_file() for marker in EXPORT_MARKERS):
            raise ConfigError(
                "--overwrite",
                f"{out_dir} holds files but no exported model ({', '.join(EXPORT_MARKERS)}); --overwrite only "
                "replaces an earlier export, so nothing else is deleted",
            )


def checkpoint_path(run_dir: Path, step: int | None) -> Path:
    """The checkpoint to export: the run's newest intact one, or the one saved at `step` (ConfigError naming
    --step with the steps that are there when there is none)."""
    from trace_core.train import dist_checkpoint

    if step is None:
        path, _, skipped = ckpt.resumable_checkpoint(run_dir)
        if path is None:  # a multi-process run: its newest intact sharded checkpoint (a directory)
            path, _, sharded_skipped = dist_checkpoint.resumable(run_dir)
            skipped += sharded_skipped
        if path is None:
            detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            raise ConfigError("RUN_DIR", f"{run_dir} has no intact checkpoint to export{detail}")
        if skipped:
            log.warning("export: skipped %s; exporting %s", "; ".join(skipped), path.name)
        return path
    folder = run_dir / "checkpoints"
    saved = {ckpt.step_of(p): p for p in folder.glob("step_*.pt") if ckpt.step_of(p) is not None}
    saved.update({int(p.name[5:]): p for p in folder.glob("step_*") if dist_checkpoint.is_checkpoint_dir(p)})
    if step not in saved:
        have = ", ".join(map(str, sorted(saved))) or "none"
        raise ConfigError("--step", f"{run_dir} has no checkpoint of step {step} (checkpoints of steps: {have})")
    return saved[step]


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished export `tmp` to `out_dir`; an earlier export there is removed only after the move."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.export-old-{os.getpid()}"
            out_dir.rename(old)
        else:
            out_dir.rmdir()
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)
