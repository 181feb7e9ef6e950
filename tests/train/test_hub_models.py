"""model.name as a Hub id or a local directory: loading from the HF cache offline, and the errors a user can
cause (offline and not cached, an unreachable Hub, an unsupported architecture), each naming model.name and
caught before a run directory is created. No test touches the network: the Hub is a cache in tmp_path (offline)
or an endpoint on a closed local port."""

import json
import sys

import pytest
from model_helpers import hub_snapshot, save_grid_model
from run_helpers import TOY, rows, trace

from trace_core.train.cli import main
from trace_core.train.config import ModelConfig

REPO_ID = "trace-test/tiny-grid"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """This process's huggingface_hub pointed at an empty cache in tmp_path, with HF_HUB_OFFLINE on (the
    settings model.name's check reads)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.slow  # a `trace train` subprocess: ~10 s on 2 cores
def test_a_hub_id_trains_offline_from_the_local_cache(tmp_path):
    cache = tmp_path / "hub"
    save_grid_model(hub_snapshot(cache, REPO_ID))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    run_dir = tmp_path / "run"
    result = trace("train", *TOY, f"run_dir={run_dir}", "steps=1", f"model.name={REPO_ID}", env=env)
    assert result.returncode == 0, result.stderr
    assert [row["step"] for row in rows(run_dir)] == [1]
    absent = trace("train", *TOY, f"run_dir={tmp_path / 'other'}", "steps=1", "model.name=trace-test/absent", env=env)
    assert absent.returncode == 2 and "model.name: 'trace-test/absent' is not in the local Hugging Face cache" in (
        absent.stderr
    )
    assert not (tmp_path / "other").exists()


def test_uncached_hub_id_offline_is_a_clear_error_before_any_run_directory(tmp_path, capsys, offline_cache):
    run_dir = tmp_path / "run"
    assert main(["train", *TOY, f"run_dir={run_dir}", "steps=1", "model.name=Qwen/Qwen3-1.7B"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.name: 'Qwen/Qwen3-1.7B' is not in the local Hugging Face cache")
    for advice in ("HF_HUB_OFFLINE", "hf download Qwen/Qwen3-1.7B", "HF_HOME", "local model directory"):
        assert advice in err
    assert not run_dir.exists()


def test_a_cached_hub_id_is_checked_offline_and_loads(offline_cache):
    from trace_core.model.hub import check_model_source

    save_grid_model(hub_snapshot(offline_cache, REPO_ID))
    source = check_model_source(REPO_ID)
    assert (source.kind, source.location, source.cached) == ("hub", REPO_ID, True)
    assert ModelConfig(name=REPO_ID).name == REPO_ID


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "name, message",
    [
        ("gpt2-dir", "is a 'gpt2' model (GPT2LMHeadModel); supported families: llama, qwen2, qwen3"),
        ("trace-test/gpt2", "is a 'gpt2' model (GPT2LMHeadModel); supported families: llama, qwen2, qwen3"),
        ("no-config-dir", "is a directory without a config.json"),
        ("a-file", "is a file; give a model directory"),
        ("bad id!", "is neither a registered model (smollm2, tiny), a model directory, nor a Hub id"),
        ("/no/such/dir", "is neither a registered model (smollm2, tiny), a model directory, nor a Hub id: no such"),
    ],
)
def test_model_name_errors(tmp_path, monkeypatch, capsys, offline_cache, name, message):
    monkeypatch.chdir(tmp_path)
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    write_config(tmp_path / "gpt2-dir", **gpt2)
    write_config(hub_snapshot(offline_cache, "trace-test/gpt2"), **gpt2)
    (tmp_path / "no-config-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "run"
    assert main(["train", *TOY, f"run_dir={run_dir}", "steps=1", f"model.name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.name: {name!r}") and message in err and "Traceback" not in err
    assert not run_dir.exists()


UNREACHABLE = """
import sys, time
import huggingface_hub.utils._http as http
http.time.sleep = lambda seconds: None  # huggingface_hub retries a refused connection 5 times, 23 s of sleeps
from trace_core.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a subprocess: ~6 s on 2 cores
def test_an_unreachable_hub_is_a_clear_error(tmp_path):
    """Online, nothing cached, the Hub down (an endpoint on a closed local port): the model build fails with
    what to do, and the run directory it had claimed is gone again."""
    import subprocess

    from run_helpers import REPO

    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "PYTHONPATH": str(REPO),
    }
    import os

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", UNREACHABLE, "train", *TOY, f"run_dir={run_dir}", "steps=1", "model.name=org/model"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "model.name: 'org/model' could not be loaded from the Hub or the local Hugging Face cache" in result.stderr
    assert "hf download org/model" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_a_local_directory_model_stops_at_its_generation_eos(tmp_path):
    """A pretrained model ends a turn at its generation_config's eos ids (the grid model lists <eos> and <eot>)."""
    from trace_core.model.policy import build_policy
    from trace_core.model.word_tokenizer import EOS, EOT

    folder = save_grid_model(tmp_path / "model")
    policy = build_policy(ModelConfig(name=str(folder), device="cpu"), "gridworld", 0)
    ids = policy.tokenizer.convert_tokens_to_ids([EOS, EOT])
    assert policy.stop_token_ids == tuple(ids)


def test_an_encoder_that_is_not_a_model_names_predictor_encoder(tmp_path, capsys, offline_cache):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TOY,
                f"run_dir={run_dir}",
                "steps=1",
                "predictor.backend=encoder",
                "predictor.encoder=org/absent",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: predictor.encoder: 'org/absent' is not in the local Hugging Face cache")
    assert not run_dir.exists()
