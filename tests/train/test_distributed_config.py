"""Config checks of a multi-process launch (WORLD_SIZE as torchrun sets it), made when the config is built."""

import pytest

from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import ConfigError, load_config
from trace_core.train.distributed import SINGLE, World, shard


def test_a_launch_over_more_ranks_than_candidates_names_the_field(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"allocation\.candidates: 2 prompts per step cannot be split over 4"):
        load_config(TrainConfig, None, ["allocation.candidates=2", "allocation.roots=8", "allocation.m_max=4"])


def test_batch_streams_are_refused_under_torchrun_and_auto_picks_episode(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"generation\.sampling_streams: 'batch'.*'episode'"):
        load_config(TrainConfig, None, ["generation.sampling_streams=batch"])
    assert load_config(TrainConfig).sampling_streams == "episode"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert load_config(TrainConfig).sampling_streams == "batch"  # one process: today's stream


def test_a_bad_strategy_names_the_field():
    with pytest.raises(ConfigError, match="strategy"):
        load_config(TrainConfig, None, ["distributed.strategy=zero3"])


@pytest.mark.parametrize("n, size", [(16, 2), (5, 2), (7, 3), (3, 3)])
def test_shards_are_contiguous_and_cover_every_candidate(n, size):
    bounds = [shard(n, World(rank=r, size=size)) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    assert shard(n, SINGLE) == (0, n)
