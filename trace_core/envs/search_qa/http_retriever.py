"""A retriever that asks an HTTP retrieval server speaking Search-R1's `/retrieve` protocol.

Protocol (Search-R1, search_r1/search/retrieval_server.py):

    POST /retrieve  {"queries": ["q1", "q2", ...], "topk": 3, "return_scores": true}
    200             {"result": [[{"document": {"id": ..., "contents": '"Title"\\ntext', ...}, "score": 12.3}, ...],
                                ...]}                 one list per query, best first
                    with "return_scores": false each list holds the documents themselves

Search-R1's own servers (dense e5 / BM25 over wiki-18) and `trace_core.envs.search_qa.server` (BM25
via bm25s) both answer it. A document's text is its "contents"; a document without one is read as
'"title"\\ntext' from "title" / "text". Scores are 0.0 when the server sends none.

`search(query, k)` makes the object a `Retriever` (retriever.py); `search_many(queries, k)` sends all
queries in one request, so an env that steps every branch of a decode round together can run all
their searches with one round trip. Every failure (connection refused, HTTP error status, timeout,
a body that is not the protocol's JSON) raises `RetrievalError`; the env reports it as a failed
search and the episode goes on. Only the standard library is used (urllib).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from trace_core.envs.base import EnvError
from trace_core.envs.search_qa.retriever import Passage

DEFAULT_PATH = "/retrieve"


class RetrievalError(RuntimeError):
    """The retrieval server could not be reached or did not answer with the protocol's JSON."""


def retrieve_url(url: str) -> str:
    """`url` checked (http/https, a host); a bare "http://host:port" gets the /retrieve path."""
    if not isinstance(url, str):
        raise EnvError("retriever_url", f"retriever_url must be a string, got {type(url).__name__}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EnvError("retriever_url", f"retriever_url must look like http://host:port/retrieve, got {url!r}")
    if parsed.path in ("", "/"):
        parsed = parsed._replace(path=DEFAULT_PATH)
    return urllib.parse.urlunsplit(parsed)


def document_text(doc: Any) -> str:
    if isinstance(doc, Mapping):
        if isinstance(doc.get("contents"), str):
            return doc["contents"]
        if isinstance(doc.get("text"), str):
            title = doc.get("title")
            return f'"{title}"\n{doc["text"]}' if isinstance(title, str) and title else doc["text"]
    if isinstance(doc, str):
        return doc
    raise RetrievalError(f"a retrieved document has no 'contents' (or 'title'/'text'): {str(doc)[:200]}")


def parse_response(body: Any, num_queries: int, k: int) -> list[list[Passage]]:
    """The protocol's response as one list of passages per query (at most k each)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("result"), list):
        raise RetrievalError(f'the server answered without a "result" list: {str(body)[:200]}')
    result = body["result"]
    if len(result) != num_queries:
        raise RetrievalError(f"the server returned {len(result)} result lists for {num_queries} queries")
    out = []
    for hits in result:
        if not isinstance(hits, list):
            raise RetrievalError(f"a result entry is not a list: {str(hits)[:200]}")
        passages = []
        for hit in hits[:k]:
            scored = isinstance(hit, Mapping) and "document" in hit
            doc = hit["document"] if scored else hit
            score = hit.get("score", 0.0) if scored else 0.0
            try:
                score = float(score)
            except (TypeError, ValueError):
                raise RetrievalError(f"a score is not a number: {score!r}") from None
            doc_id = doc.get("id", doc.get("doc_id", "")) if isinstance(doc, Mapping) else ""
            passages.append(Passage(str(doc_id), document_text(doc), score if math.isfinite(score) else 0.0))
        out.append(passages)
    return out


class HTTPRetriever:
    """Client of a `/retrieve` server (module docstring).

    url            the endpoint ("http://127.0.0.1:8000/retrieve"; a bare host:port gets /retrieve)
    topk           passages per query when `search_many` is called without k
    timeout_s      socket timeout of each request (keep it at or under the env's tool_timeout_s, so a
                   call the env gave up on does not hold its worker thread much longer)
    return_scores  ask the server for scores (Search-R1's client does)
    """

    def __init__(self, url: str, *, topk: int = 3, timeout_s: float | None = 10.0, return_scores: bool = True):
        self.url = retrieve_url(url)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise EnvError("topk", f"topk must be an integer >= 1, got {topk!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise EnvError("timeout_s", f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.topk, self.timeout_s, self.return_scores = topk, timeout_s, bool(return_scores)

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url!r}, topk={self.topk}, timeout_s={self.timeout_s})"

    def search(self, query: str, k: int) -> list[Passage]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int | None = None) -> list[list[Passage]]:
        """At most `k` (default: topk) passages for each query, best first, in one request."""
        k = self.topk if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EnvError("k", f"k must be an integer >= 1, got {k!r}")
        queries = list(queries)
        if not queries:
            return []
        if not all(isinstance(q, str) for q in queries):
            raise EnvError("queries", "queries must be strings")
        payload = json.dumps({"queries": queries, "topk": k, "return_scores": self.return_scores}).encode()
        request = urllib.request.Request(
            self.url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise RetrievalError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RetrievalError(f"could not reach {self.url}: {reason}") from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetrievalError(f"{self.url} did not answer JSON: {raw[:200]!r}") from None
        return parse_response(body, len(queries), k)


@lru_cache(maxsize=16)
def http_retriever(url: str, topk: int = 3, timeout_s: float | None = 10.0) -> HTTPRetriever:
    """One shared client per (url, topk, timeout): every env of a run holds the same object, so a
    batched step can tell their searches go to one server."""
    return HTTPRetriever(url, topk=topk, timeout_s=timeout_s)
