"""A retrieval server over a BM25 index (bm25s) speaking Search-R1's `/retrieve` protocol (http_retriever.py).

    python -m trace_core.envs.search_qa.server --corpus corpus.jsonl --port 8000 --topk 3
    (`trace retriever serve` runs `main`)

    POST /retrieve  {"queries": [...], "topk": k, "return_scores": bool}
                    -> {"result": [[{"document": {"id", "contents", "title", "text"}, "score": s}, ...], ...]}
                       (return_scores false: the documents alone); topk null or absent: the server's --topk
    GET  /health    -> {"status": "ok", "passages": N}

As Search-R1's BM25 server does, a document carries "contents" and its split into "title" (the first
line, quotes stripped) and "text" (the rest). A query with no term in common with the corpus gets an
empty list. A bad request gets HTTP 400 with {"error": message}; an unknown path 404.

The standard library's ThreadingHTTPServer serves requests in threads; searches run one at a time
under a lock (bm25s is not documented as thread-safe; one request carries a whole batch anyway).
`running(index)` starts a server in a background thread for tests and scripts and stops it on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trace_core.envs.base import EnvError
from trace_core.envs.search_qa.retriever import Passage, Retriever

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TOPK = 1000


def passage_document(passage: Passage) -> dict[str, Any]:
    lines = passage.contents.split("\n")
    return {
        "id": passage.id,
        "contents": passage.contents,
        "title": lines[0].strip().strip('"'),
        "text": "\n".join(lines[1:]),
    }


class RetrievalServer(ThreadingHTTPServer):
    """HTTP server holding the index; `url` is its /retrieve endpoint."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], index: Retriever, *, topk: int = 3, verbose: bool = False):
        if not callable(getattr(index, "search", None)):
            raise EnvError("index", f"index must have a search(query, k) method, got {type(index).__name__}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise EnvError("topk", f"topk must be an integer >= 1, got {topk!r}")
        self.index, self.topk, self.verbose = index, topk, verbose
        self.lock = threading.Lock()
        super().__init__(address, RetrievalHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/retrieve"

    def retrieve(self, queries: list[str], k: int) -> list[list[Passage]]:
        with self.lock:
            many = getattr(self.index, "search_many", None)
            if callable(many):
                return [list(hits) for hits in many(queries, k)]
            return [list(self.index.search(q, k)) for q in queries]


class RetrievalHandler(BaseHTTPRequestHandler):
    server: RetrievalServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:
        if self._path() == "/health":
            passages = getattr(self.server.index, "passages", None)
            self._send(200, {"status": "ok", "passages": len(passages) if passages is not None else None})
        else:
            self._send(404, {"error": f"unknown path {self.path!r}; POST /retrieve"})

    def do_POST(self) -> None:
        if self._path() != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path!r}; POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, {"error": "a Content-Length header is required"})
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            queries, k, scores = self._parse(request)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._send(400, {"error": "the body is not valid JSON"})
            return
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
            return
        try:
            hits = self.server.retrieve(queries, k)
        except Exception as exc:  # the index failed: tell the client, keep serving
            self._send(500, {"error": f"retrieval failed: {type(exc).__name__}: {exc}"})
            return
        result = [
            [{"document": passage_document(p), "score": float(p.score)} if scores else passage_document(p) for p in h]
            for h in hits
        ]
        self._send(200, {"result": result})

    def _parse(self, request: Any) -> tuple[list[str], int, bool]:
        if not isinstance(request, dict):
            raise ValueError('the body must be a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
        queries = request.get("queries")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError('"queries" must be a list of strings')
        k = request.get("topk")
        k = self.server.topk if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOPK:
            raise ValueError(f'"topk" must be an integer in [1, {MAX_TOPK}] or null')
        scores = request.get("return_scores", False)
        if not isinstance(scores, bool):
            raise ValueError('"return_scores" must be true or false')
        return queries, k, scores

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def make_server(
    index: Retriever, host: str = "127.0.0.1", port: int = 8000, *, topk: int = 3, verbose: bool = False
) -> RetrievalServer:
    """A bound, not yet serving, server (port 0: an ephemeral port, see `.url`)."""
    return RetrievalServer((host, port), index, topk=topk, verbose=verbose)


def serve(index: Retriever, host: str = "127.0.0.1", port: int = 8000, *, topk: int = 3, verbose: bool = True) -> None:
    """Serve `index` until interrupted (Ctrl-C)."""
    server = make_server(index, host, port, topk=topk, verbose=verbose)
    print(f"[retriever] serving at {server.url} (topk {topk}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@contextlib.contextmanager
def running(index: Retriever, host: str = "127.0.0.1", port: int = 0, *, topk: int = 3) -> Iterator[RetrievalServer]:
    """A server on a background thread for the duration of the block (port 0: an ephemeral one)."""
    server = make_server(index, host, port, topk=topk, verbose=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace retriever serve",
        description="Serve BM25 (bm25s) over a corpus with Search-R1's /retrieve protocol.",
    )
    parser.add_argument("--corpus", required=True, help='corpus JSONL, one {"id", "contents"} per line')
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--topk", type=int, default=3, help="passages per query when a request gives no topk")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.topk < 1:
        print("error: --topk must be >= 1", file=sys.stderr)
        return 2
    from trace_core.envs.search_qa.retriever import bm25_from_file

    try:
        index = bm25_from_file(args.corpus)
    except EnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[retriever] indexed {len(index.passages)} passages from {args.corpus}", flush=True)
    try:
        serve(index, args.host, args.port, topk=args.topk, verbose=not args.quiet)
    except OSError as err:  # port taken, address not available
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
