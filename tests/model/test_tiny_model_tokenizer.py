"""Word-level tokenizer (tokenizers + PreTrainedTokenizerFast) and the tiny random-init model."""

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trace_core.envs.base import EnvError
from trace_core.envs.gridworld.env import GridWorldEnv
from trace_core.envs.gridworld.tasks import generate_grid_tasks
from trace_core.model.tiny import build_tiny_model, tiny_model_config
from trace_core.model.word_tokenizer import (
    EOT,
    SPECIAL_TOKENS,
    UNK,
    build_word_tokenizer,
    gridworld_tokenizer,
)


def test_every_gridworld_word_is_one_known_token():
    tok = gridworld_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    env = GridWorldEnv(on_invalid="continue")
    texts = []
    for task in generate_grid_tasks(40, seed=0):
        texts.append(env.reset(task, seed=0))
        texts += [env.step(a).observation for a in ("north", "jump", "east")]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_end_of_turn_token_and_special_handling():
    tok = gridworld_tokenizer()
    eot = tok.convert_tokens_to_ids(EOT)
    ids = tok("north<eot>", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("north"), eot]
    assert tok.decode(ids, skip_special_tokens=True) == "north"
    assert tok("goal", add_special_tokens=True)["input_ids"] == [tok.convert_tokens_to_ids("goal")]  # nothing added
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(UNK)]


def test_save_and_reload_through_auto_tokenizer(tmp_path):
    tok = gridworld_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "level 3 turns 9 goal 4 south 2 west hole east"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token == "<pad>" and again.eos_token == "<eos>" and again.bos_token == "<bos>"


def test_bad_words_are_rejected():
    with pytest.raises(EnvError, match="words"):
        build_word_tokenizer(["two words"])
    with pytest.raises(EnvError, match="words"):
        build_word_tokenizer([""])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_runs_and_stops_at_end_of_turn(arch):
    tok = gridworld_tokenizer()
    model = build_tiny_model(tok, arch=arch, seed=0)
    assert model.config.vocab_size == len(tok)
    assert tok.convert_tokens_to_ids(EOT) in model.config.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 200_000
    ids = tok("<bos> level 0 turns 3 goal 1 east", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    same = build_tiny_model(tok, arch=arch, seed=0)
    other = build_tiny_model(tok, arch=arch, seed=1)
    assert torch.equal(same(ids).logits, logits) and not torch.equal(other(ids).logits, logits)
    # Bias the output layer so <eot> always wins: generation must stop right after one token.
    head_bias = torch.zeros(len(tok))
    head_bias[tok.convert_tokens_to_ids(EOT)] = 10.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + head_bias)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0, ids.shape[1] :].tolist() == [tok.convert_tokens_to_ids(EOT)]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"arch": "gpt2"}, "arch"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 30}, "num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_layers": -1}, "num_layers"),
    ],
)
def test_tiny_model_config_errors_name_the_field(kwargs, field):
    with pytest.raises(EnvError, match=field):
        tiny_model_config(gridworld_tokenizer(), **kwargs)
