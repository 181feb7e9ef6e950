"""Word-level tokenizers for the embedded envs, built with `tokenizers` and wrapped for transformers.

One token per whitespace-separated word of a fixed vocabulary, so a tiny model trained from
scratch sees each word of an embedded env (grid world, multi-hop lookup) as one symbol. Envs name
their tokenizer in `WORD_TOKENIZERS` (env name -> builder; `register_word_tokenizer` adds one), which
model.name=tiny reads. The result is a
`transformers.PreTrainedTokenizerFast`, so the engine and trainer use the same HF code paths
(encode, decode, save_pretrained / AutoTokenizer.from_pretrained) as with a real model.

Special tokens: <pad> <unk> <bos> <eos> and <eot> (end of turn). The policy ends each action
with <eot>; an engine uses it as the stop token of a turn. Nothing is added automatically when
encoding (no post-processor): the engine places <bos> before the prompt itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trace_core.envs.base import EnvError
from trace_core.envs.gridworld.tasks import DIRECTIONS, LEVELS, MAX_SIZE, MAX_TURNS

PAD, UNK, BOS, EOS, EOT = "<pad>", "<unk>", "<bos>", "<eos>", "<eot>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, EOT)  # ids 0..4 in this order

GRIDWORLD_WORDS = (
    *DIRECTIONS,
    "goal",
    "wall",
    "hole",
    "level",
    "turns",
    "invalid",
    *(str(i) for i in range(max(MAX_TURNS, MAX_SIZE, max(LEVELS)) + 1)),
)


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over SPECIAL_TOKENS + `words` (ids in that order); unknown words -> <unk>."""
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise EnvError("words", f"every word must be a non-empty string without whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[EOT],
    )


def gridworld_tokenizer() -> PreTrainedTokenizerFast:
    """The grid world's tokenizer: every prompt, observation and action word is one token."""
    return build_word_tokenizer(GRIDWORLD_WORDS)


def multihop_words() -> tuple[str, ...]:
    """Entities, "answer" and the observation words; not "lookup": the model's actions are one word
    (an entity to look up, or "answer"), and every word it can emit outside them is invalid."""
    from trace_core.envs.multihop.tasks import ENTITIES, LEVELS, MAX_TURNS

    digits = (str(i) for i in range(max(MAX_TURNS, max(LEVELS)) + 1))
    return ("answer", *ENTITIES, "left", "fail", "none", "invalid", "level", "turns", *digits)


def multihop_tokenizer() -> PreTrainedTokenizerFast:
    """The multi-hop lookup env's tokenizer: every prompt, observation and action word is one token."""
    return build_word_tokenizer(multihop_words())


# env name -> builder of the word tokenizer a tiny model for that env uses
WORD_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "gridworld": gridworld_tokenizer,
    "multihop": multihop_tokenizer,
}


def register_word_tokenizer(
    env_name: str, builder: Callable[[], PreTrainedTokenizerFast], *, replace: bool = False
) -> None:
    """Let model.name=tiny run on env `env_name`, with the tokenizer `builder()` returns."""
    if not isinstance(env_name, str) or not env_name:
        raise EnvError("env_name", f"env_name must be a non-empty string, got {env_name!r}")
    if not callable(builder):
        raise EnvError("builder", f"builder for {env_name!r} must be callable, got {builder!r}")
    if env_name in WORD_TOKENIZERS and not replace:
        raise EnvError("env_name", f"env {env_name!r} already has a word tokenizer; pass replace=True")
    WORD_TOKENIZERS[env_name] = builder


def word_tokenizer_for(env_name: str) -> PreTrainedTokenizerFast | None:
    """The word tokenizer registered for `env_name`, or None when it has none."""
    builder = WORD_TOKENIZERS.get(env_name)
    return None if builder is None else builder()
