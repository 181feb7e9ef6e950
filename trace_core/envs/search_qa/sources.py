"""Config-level constructors for the search QA env: env factory and task source.

corpus_path None means the synthetic multi-hop world of `synthetic_seed` (synthetic_qa.py), so
`make_env("search_qa")` works out of the box; pass a FlashRAG-format corpus JSONL otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from trace_core.envs.base import EnvError, check_split
from trace_core.envs.search_qa.data import load_fanoutqa_dev
from trace_core.envs.search_qa.data_searchr1 import load_qa_file
from trace_core.envs.search_qa.env import DEFAULT_PROMPT, SearchQAEnv
from trace_core.envs.search_qa.retriever import BM25Retriever, bm25_from_file
from trace_core.envs.search_qa.synthetic import build_world, synthetic_qa_tasks

FANOUTQA_DEV = "fanoutqa-dev"  # eval_path value that loads the FanOutQA dev set shipped in its wheel


@lru_cache(maxsize=4)
def synthetic_retriever(seed: int) -> BM25Retriever:
    return BM25Retriever(build_world(seed).corpus)


def make_search_qa_env(
    corpus_path: str | None = None,
    synthetic_seed: int = 0,
    top_k: int = 3,
    max_turns: int = 5,
    reward: str = "em",
    f1_threshold: float = 0.8,
    on_invalid: str = "continue",
    tool_timeout_s: float | None = 10.0,
    prompt_template: str = DEFAULT_PROMPT,
    retriever_url: str | None = None,
) -> SearchQAEnv:
    """A SearchQAEnv over BM25 of `corpus_path` (indexed once per process), of the synthetic world, or over
    the retrieval server at `retriever_url` (its client times out with tool_timeout_s)."""
    if retriever_url is not None:
        if corpus_path is not None:
            raise EnvError("retriever_url", "give corpus_path (local BM25) or retriever_url (a server), not both")
        from trace_core.envs.search_qa.http_retriever import http_retriever

        retriever: Any = http_retriever(retriever_url, top_k, tool_timeout_s)
    else:
        retriever = synthetic_retriever(synthetic_seed) if corpus_path is None else bm25_from_file(corpus_path)
    return SearchQAEnv(
        retriever,
        top_k=top_k,
        max_turns=max_turns,
        reward=reward,
        f1_threshold=f1_threshold,
        on_invalid=on_invalid,
        tool_timeout_s=tool_timeout_s,
        prompt_template=prompt_template,
    )


class QATaskSource:
    """train_path / eval_path: QA JSONL files or Search-R1 .parquet / JSONL files (eval_path may be
    "fanoutqa-dev"); None -> synthetic questions. format "auto" | "qa" | "searchr1", data_sources (Search-R1
    rows of these sources only) and shuffle_seed: see data_searchr1.load_qa_file."""

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        synthetic_seed: int = 0,
        format: str = "auto",
        data_sources: list[str] | None = None,
        shuffle_seed: int | None = None,
    ):
        self.paths = {"train": train_path, "eval": eval_path}
        self.synthetic_seed = synthetic_seed
        self.file_options = {"format": format, "data_sources": data_sources, "shuffle_seed": shuffle_seed}

    def tasks(self, split: str) -> list[dict[str, Any]]:
        path = self.paths[check_split(split)]
        if path is None:
            return synthetic_qa_tasks(build_world(self.synthetic_seed), split)
        if path == FANOUTQA_DEV:
            return load_fanoutqa_dev()
        return load_qa_file(path, **self.file_options)
