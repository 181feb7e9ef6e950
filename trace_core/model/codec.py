"""Text <-> token ids for an engine: prompts, observations, and the model's actions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class TextCodec(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of the prompt (the root), including any BOS / chat template."""

    def encode_observation(self, text: str) -> list[int]:
        """Token ids appended after a turn's action (no BOS)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the model's tokens (the action handed to the env, and for stop strings)."""


class HFTextCodec:
    """A Hugging Face tokenizer as a TextCodec.

    chat_template         wrap the prompt as one user message plus the assistant generation prompt
    observation_template  format string around each observation, e.g. for ChatML
                          "\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
    """

    def __init__(self, tokenizer, *, chat_template: bool = False, observation_template: str = "{observation}"):
        if "{observation}" not in observation_template:
            raise ValueError(f"observation_template: must contain '{{observation}}', got {observation_template!r}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.observation_template = observation_template
        eos = tokenizer.eos_token_id
        self.eos_token_ids = tuple([] if eos is None else [eos] if isinstance(eos, int) else list(eos))

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_observation(self, text: str) -> list[int]:
        wrapped = self.observation_template.replace("{observation}", text)
        return list(self.tokenizer(wrapped, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
