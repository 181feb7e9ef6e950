"""`model.name` as a Hugging Face Hub id ("Qwen/Qwen3-1.7B") or a local model directory.

Two steps, so a user's mistake is caught as early as it can be:

- `check_model_source(name)` runs when the config is built (no torch, no network): a local directory must hold a
  config.json of a supported family; a Hub id must be well formed, and when the Hub cannot be used
  (`HF_HUB_OFFLINE=1`) it must already be in the local HF cache. A cached or local config.json is read to
  check the architecture.
- `load_pretrained(name, dtype)` runs when the model is built: `AutoModelForCausalLM` / `AutoTokenizer`
  `.from_pretrained`, with what can still go wrong there (an unknown id, an unreachable Hub, a download that
  fails) turned into a ConfigError naming model.name and saying what to do.

The cache is huggingface_hub's own (HF_HOME / HF_HUB_CACHE); nothing here reads or writes it by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_core.train.config_loader import ConfigError

# model_type values whose modelling code the packed tree forward, the paged engine and the fused logprob are
# tested with (transformers' Llama / Qwen2 / Qwen3 classes; SmolLM2 is a Llama)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
FIELD = "model.name"


@dataclass(frozen=True)
class ModelSource:
    """Where `model.name` points: kind "dir" (a local directory) or "hub" (a Hub id); `location` is what
    from_pretrained gets; `cached` is whether its config.json was found without the network."""

    kind: str
    location: str
    cached: bool


def hub_offline() -> bool:
    """Whether huggingface_hub may not use the network (HF_HUB_OFFLINE, read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _what_to_do(name: str) -> str:
    return (
        f"download it first where the Hub is reachable (`hf download {name}`), point HF_HOME (or HF_HUB_CACHE) at "
        "the cache that holds it, or set model.name to a local model directory"
    )


def check_model_source(name: str, registered: tuple[str, ...] = ("tiny", "smollm2")) -> ModelSource:
    """ModelSource of `name` (not one of the `registered` model names), or a ConfigError naming model.name.
    No network."""
    neither = (
        f"{name!r} is neither a registered model ({', '.join(sorted(registered))}), a model directory, nor a Hub id"
    )
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(FIELD, f"{name!r} is a directory without a config.json: not a Hugging Face model")
        check_architecture(name, _read_json(config, name))
        return ModelSource("dir", str(path.resolve()), cached=True)  # absolute: an exported adapter names it
    if path.exists():
        raise ConfigError(FIELD, f"{name!r} is a file; give a model directory (with a config.json) or a Hub id")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ConfigError(FIELD, f"{neither}: no such directory")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ConfigError(FIELD, f"{neither} like 'Qwen/Qwen3-1.7B' ({err})") from None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        check_architecture(name, _read_json(Path(cached), name))
        return ModelSource("hub", name, cached=True)
    if hub_offline():
        raise ConfigError(
            FIELD,
            f"{name!r} is not in the local Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded; {_what_to_do(name)}",
        )
    return ModelSource("hub", name, cached=False)  # downloaded (and checked) when the model is built


def check_architecture(name: str, config: dict[str, Any]) -> None:
    """ConfigError unless the config.json mapping `config` is of a supported family."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            FIELD,
            f"{name!r} is a {model_type or 'model of unknown type'!r} model ({', '.join(config.get('architectures') or [])}); "
            f"supported families: {', '.join(SUPPORTED_MODEL_TYPES)} (their causal LMs)",
        )


def load_pretrained(name: str, dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of the Hub id or directory `name` in parameter dtype `dtype`, in eval mode."""
    source = check_model_source(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source.location)
        check_architecture(name, config.to_dict())
        model = AutoModelForCausalLM.from_pretrained(source.location, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:  # huggingface_hub's errors (not found, offline, HTTP) are OSErrors
        where = "the local directory" if source.kind == "dir" else "the Hub or the local Hugging Face cache"
        hint = "" if source.kind == "dir" else f"; if the Hub is unreachable from here, {_what_to_do(name)}"
        raise ConfigError(
            FIELD, f"{name!r} could not be loaded from {where} ({type(err).__name__}: {_first_line(err)}){hint}"
        ) from None
    return model.eval(), tokenizer


def generation_stop_ids(model) -> tuple[int, ...]:
    """The token ids that end a turn by the model's generation_config.json (eos_token_id: an int or a list; an
    instruct model lists its end-of-turn token there, e.g. Qwen3's <|im_end|>, which may differ from the
    tokenizer's eos)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(i) for i in ([eos] if isinstance(eos, int) else eos))


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(FIELD, f"{name!r}: cannot read its config.json {path} ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(FIELD, f"{name!r}: its config.json {path} does not hold a mapping")
    return data


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
