"""Retrieval tools for the search env: a pluggable interface and a BM25 implementation (bm25s).

Corpus format (FlashRAG / Search-R1): JSONL, one passage per line, {"id": str, "contents": str};
`contents` conventionally starts with the quoted title on its own line ('"Title"\\ntext').

Any object with `search(query, k) -> list[Passage]` is a retriever, so users can plug in a
dense index or an HTTP retrieval server; the env runs it under its tool timeout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import bm25s
import numpy as np

from trace_core.envs.base import EnvError
from trace_core.envs.search_qa.data import iter_jsonl


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Passage]:
        """At most `k` passages for `query`, best first; [] when nothing matches."""


def load_corpus(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a corpus JSONL file; EnvError naming the line and field of any bad record."""
    records = [check_passage(record, where) for _, where, record in iter_jsonl(path, "corpus_path")]
    if not records:
        raise EnvError("corpus_path", f"corpus_path {str(path)!r} holds no passages")
    return records


def check_passage(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, Mapping):
        raise EnvError(where, "a corpus record must be a JSON object")
    for name in ("id", "contents"):
        if name not in record:
            raise EnvError(where, f"corpus record is missing the field {name!r}")
    if not isinstance(record["contents"], str):
        raise EnvError(where, "corpus field 'contents' must be a string")
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise EnvError(where, "corpus field 'id' must be a string or integer")
    return {"id": str(record["id"]), "contents": record["contents"]}


class BM25Retriever:
    """BM25 (bm25s, Lucene variant) over an in-memory corpus; English stop words removed.

    Passages with score 0 (no query term in common) are not returned, so a query with no match
    gives an empty list rather than arbitrary passages.
    """

    def __init__(self, corpus: Sequence[Mapping[str, Any]], *, stopwords: str | None = "en"):
        self.passages = [check_passage(r, f"corpus[{i}]") for i, r in enumerate(corpus)]
        if not self.passages:
            raise EnvError("corpus", "corpus must hold at least one passage")
        self.stopwords = stopwords
        tokens = bm25s.tokenize([p["contents"] for p in self.passages], stopwords=stopwords, show_progress=False)
        if not tokens.vocab:  # bm25s itself fails on an empty vocabulary with a bare max() error
            removed = f" once the stop words ({stopwords!r}) are removed" if stopwords else ""
            raise EnvError(
                "corpus",
                f"no passage of the corpus has a searchable term{removed}: every query would find "
                "nothing. Index real text (or pass stopwords=None to keep stop words)",
            )
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[Passage]:
        if k < 1:
            raise EnvError("k", f"k must be >= 1, got {k}")
        tokens = bm25s.tokenize([query], stopwords=self.stopwords, return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        k = min(k, len(self.passages))
        docs, scores = self._bm25.retrieve(tokens, k=k, show_progress=False)
        return [
            Passage(self.passages[int(d)]["id"], self.passages[int(d)]["contents"], float(s))
            for d, s in zip(docs[0], scores[0])
            if s > 0 and np.isfinite(s)
        ]


@lru_cache(maxsize=8)
def _cached_bm25(path: str, mtime_ns: int) -> BM25Retriever:
    return BM25Retriever(load_corpus(path))


def bm25_from_file(corpus_path: str | os.PathLike) -> BM25Retriever:
    """BM25 over a corpus JSONL file; indexed once per (path, modification time) per process."""
    path = Path(corpus_path)
    if not path.is_file():
        raise EnvError("corpus_path", f"corpus_path {str(path)!r} does not exist or is not a file")
    return _cached_bm25(str(path.resolve()), path.stat().st_mtime_ns)
