"""Search-R1-format QA: the row loader (JSONL, parquet), the /retrieve client against a real local server
(started on 127.0.0.1, an ephemeral port, stopped by the test), the server's protocol and errors, the
search_qa env over HTTP, and the `main` entry point in a subprocess."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trace_core.envs import make_env, make_task_source
from trace_core.envs.base import EnvError
from trace_core.envs.search_qa.data_searchr1 import (
    SEARCH_R1_PROMPT,
    load_qa_file,
    load_searchr1,
    to_searchr1_row,
    write_searchr1_jsonl,
)
from trace_core.envs.search_qa.http_retriever import HTTPRetriever, RetrievalError, retrieve_url
from trace_core.envs.search_qa.retriever import BM25Retriever, Retriever
from trace_core.envs.search_qa.server import main, make_server, running
from trace_core.envs.search_qa.synthetic import build_world, synthetic_qa_tasks

CORPUS = [
    {"id": "a", "contents": '"Velmora"\nVelmora is a city in Dranthia.'},
    {"id": "b", "contents": '"Ossik Tarn"\nOssik Tarn was born in Velmora.'},
    {"id": "c", "contents": '"Dranthia"\nThe currency of Dranthia is the quill.'},
]
TASK = {"id": "q1", "question": "In which country was Ossik Tarn born?", "golden_answers": ["Dranthia"]}

# rows as Search-R1's scripts/data_process/qa_search_*_merge.py write them (FlashRAG columns kept)
ROWS = [
    {
        "id": "train_0",
        "question": "who got the first nobel prize in physics?",
        "golden_answers": ["Wilhelm Conrad Röntgen"],
        "data_source": "nq",
        "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format(question="who got the first nobel prize?")}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Wilhelm Conrad Röntgen"]}},
        "extra_info": {"split": "train", "index": 0},
    },
    {  # no question / golden_answers columns: read from the prompt and the reward model
        "data_source": "hotpotqa",
        "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format(question="Which city hosts the Louvre?")}],
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Paris", "Paris, France"]}},
        "extra_info": {"split": "train", "index": 7},
    },
    {"question": "What is 2+2?", "golden_answers": "4", "data_source": "bamboogle", "metadata": {"hops": 1}},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- loader ------------------------------------------------------------------------------------


def test_searchr1_rows_become_qa_tasks(tmp_path):
    tasks = load_searchr1(write_rows(tmp_path / "train.jsonl", ROWS))
    assert [t["id"] for t in tasks] == ["train_0", "hotpotqa-7", "train-3"]
    assert tasks[0]["question"] == "who got the first nobel prize in physics?"
    assert tasks[0]["golden_answers"] == ["Wilhelm Conrad Röntgen"]
    assert tasks[0]["metadata"] == {"data_source": "nq", "split": "train", "index": 0}
    assert tasks[1]["question"] == "Which city hosts the Louvre?" and tasks[1]["golden_answers"] == [
        "Paris",
        "Paris, France",
    ]
    assert tasks[2]["golden_answers"] == ["4"] and tasks[2]["metadata"] == {"hops": 1, "data_source": "bamboogle"}
    kept = load_searchr1(tmp_path / "train.jsonl", data_sources=["nq", "bamboogle"])
    assert [t["id"] for t in kept] == ["train_0", "train-3"]
    shuffled = load_searchr1(tmp_path / "train.jsonl", shuffle_seed=3)
    assert sorted(t["id"] for t in shuffled) == sorted(t["id"] for t in tasks)
    assert shuffled == load_searchr1(tmp_path / "train.jsonl", shuffle_seed=3)


def test_task_source_reads_searchr1_files_and_plain_qa_alike(tmp_path):
    world = build_world(0)
    train = write_searchr1_jsonl(tmp_path / "train.jsonl", synthetic_qa_tasks(world, "train"), "synthetic", "train")
    plain = tmp_path / "plain.jsonl"
    write_rows(plain, [TASK])
    source = make_task_source("search_qa", train_path=str(train), eval_path=str(plain))
    got = source.tasks("train")
    assert len(got) == len(synthetic_qa_tasks(world, "train")) and got[0]["metadata"]["data_source"] == "synthetic"
    assert got[0]["question"] == synthetic_qa_tasks(world, "train")[0]["question"]
    assert source.tasks("eval") == [{**TASK, "metadata": {}}]
    assert load_qa_file(plain, "searchr1")[0]["golden_answers"] == ["Dranthia"]  # FlashRAG rows are Search-R1 rows too
    with pytest.raises(EnvError, match="format"):
        load_qa_file(plain, "csv")
    with pytest.raises(EnvError, match="data_sources"):
        load_qa_file(plain, "qa", data_sources=["nq"])
    row = to_searchr1_row(TASK, "nq", "test", 4)
    assert (
        row["reward_model"]["ground_truth"]["target"] == ["Dranthia"]
        and "Question: In which" in row["prompt"][0]["content"]
    )


def test_bad_rows_name_the_line(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"data_source": "nq", "golden_answers": ["x"]}])
    with pytest.raises(EnvError, match=r"bad.jsonl:2"):
        load_searchr1(path)
    path = write_rows(tmp_path / "noanswer.jsonl", [{"question": "q?", "data_source": "nq"}])
    with pytest.raises(EnvError, match="golden_answers"):
        load_searchr1(path)
    with pytest.raises(EnvError, match="holds no rows with data_source"):
        load_searchr1(write_rows(tmp_path / "ok.jsonl", ROWS), data_sources=["musique"])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(EnvError, match="needs pyarrow: `pip install pyarrow`"):
        load_qa_file(path)


def test_parquet_rows_load_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), path)
    tasks = load_qa_file(path)
    assert [t["id"] for t in tasks] == ["train_0", "hotpotqa-7"] and tasks[1]["golden_answers"] == [
        "Paris",
        "Paris, France",
    ]


# --- server and client ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with running(BM25Retriever(CORPUS), topk=2) as srv:
        yield srv


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_speaks_search_r1_protocol(server):
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/retrieve")
    status, body = post(server.url, {"queries": ["Ossik Tarn", "zeppelin harmonica"], "topk": 2, "return_scores": True})
    assert status == 200 and set(body) == {"result"} and len(body["result"]) == 2
    first = body["result"][0][0]
    assert set(first) == {"document", "score"} and isinstance(first["score"], float)
    assert first["document"] == {
        "id": "b",
        "contents": '"Ossik Tarn"\nOssik Tarn was born in Velmora.',
        "title": "Ossik Tarn",
        "text": "Ossik Tarn was born in Velmora.",
    }
    assert body["result"][1] == []  # no term in common
    status, body = post(server.url, {"queries": ["Velmora"], "return_scores": False})  # server's topk (2)
    assert status == 200 and [d["id"] for d in body["result"][0]] == ["a", "b"] and "score" not in body["result"][0][0]
    with urllib.request.urlopen(server.url.replace("/retrieve", "/health"), timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "passages": 3}


@pytest.mark.parametrize(
    "body,raw,status,message",
    [
        ({"queries": "Velmora"}, None, 400, "list of strings"),
        ({"queries": ["a"], "topk": 0}, None, 400, "topk"),
        ({"queries": ["a"], "return_scores": "yes"}, None, 400, "return_scores"),
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
    ],
)
def test_server_rejects_bad_requests(server, body, raw, status, message):
    got_status, got = post(server.url, body, raw)
    assert got_status == status and message in got["error"]


def test_server_unknown_path_is_404(server):
    status, body = post(server.url.replace("/retrieve", "/search"), {"queries": ["a"]})
    assert status == 404 and "POST /retrieve" in body["error"]


def test_client_searches_one_and_many(server):
    client = HTTPRetriever(server.url, topk=2)
    assert isinstance(client, Retriever)
    hits = client.search("Ossik Tarn", 1)
    assert [p.id for p in hits] == ["b"] and hits[0].contents.startswith('"Ossik Tarn"') and hits[0].score > 0
    many = client.search_many(["Velmora", "zeppelin harmonica", "quill currency"])
    assert [[p.id for p in h] for h in many] == [["a", "b"], [], ["c"]]
    assert client.search_many([]) == []
    local = BM25Retriever(CORPUS)
    assert [p.id for p in client.search("Dranthia city", 2)] == [p.id for p in local.search("Dranthia city", 2)]
    assert retrieve_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/retrieve"
    with pytest.raises(EnvError, match="retriever_url"):
        HTTPRetriever("127.0.0.1:8000")


@contextlib.contextmanager
def fake_server(handler_body):
    """A server on 127.0.0.1 whose POST handler is `handler_body(handler)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            handler_body(self)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/retrieve"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def reply(status, text):
    def body(handler):
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return body


@pytest.mark.parametrize(
    "status,text,message",
    [
        (500, '{"error": "boom"}', "HTTP 500"),
        (200, "<html>", "did not answer JSON"),
        (200, '{"result": []}', "0 result lists for 1 queries"),
        (200, '{"results": [[]]}', '"result" list'),
        (200, '{"result": [[{"document": {"id": 1}, "score": 1.0}]]}', "no 'contents'"),
    ],
)
def test_client_errors_are_retrieval_errors(status, text, message):
    with fake_server(reply(status, text)) as url, pytest.raises(RetrievalError, match=message):
        HTTPRetriever(url).search("q", 1)


def test_client_times_out_and_unreachable_server_fails_fast():
    release = threading.Event()

    def stall(handler):
        release.wait(5)

    with fake_server(stall) as url:
        start = time.perf_counter()
        with pytest.raises(RetrievalError, match="could not reach"):
            HTTPRetriever(url, timeout_s=0.3).search("q", 1)
        assert time.perf_counter() - start < 3
        release.set()
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetrievalError, match="could not reach"):
        HTTPRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=2).search("q", 1)


def test_search_qa_env_over_the_server(server):
    env = make_env("search_qa", retriever_url=server.url, top_k=2, max_turns=3)
    env.reset(TASK)
    step = env.step("<search> Ossik Tarn </search>")
    assert not step.done and step.info["retrieved_ids"] == ["b"]
    assert step.observation.startswith('\n<information>Doc 1: "Ossik Tarn" Ossik Tarn was born in Velmora.')
    assert env.step("<answer> Dranthia </answer>").reward == 1.0
    assert make_env("search_qa", retriever_url=server.url, top_k=2).retriever is env.retriever  # one shared client
    with pytest.raises(EnvError, match="not both"):
        make_env("search_qa", retriever_url=server.url, corpus_path="corpus.jsonl")


def test_search_qa_env_reports_a_dead_server_as_a_failed_search():
    with running(BM25Retriever(CORPUS)) as srv:
        url = srv.url
    env = make_env("search_qa", retriever_url=url, tool_timeout_s=5.0)
    env.reset(TASK)
    step = env.step("<search> Ossik Tarn </search>")
    assert not step.done and "Search failed: RetrievalError" in step.observation and "tool_error" in step.info


def test_make_server_validates_its_arguments():
    with pytest.raises(EnvError, match="index"):
        make_server(object(), port=0)
    with pytest.raises(EnvError, match="topk"):
        make_server(BM25Retriever(CORPUS), port=0, topk=0)


def test_main_serves_a_corpus_file(tmp_path):
    """`python -m trace_core.envs.search_qa.server --corpus ...` in a subprocess, queried, then stopped."""
    corpus = write_rows(tmp_path / "corpus.jsonl", CORPUS)
    assert main(["--corpus", str(tmp_path / "missing.jsonl")]) == 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "trace_core.envs.search_qa.server", "--corpus", str(corpus), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client, deadline = HTTPRetriever(f"http://127.0.0.1:{port}", timeout_s=2), time.monotonic() + 60
        while True:
            try:
                hits = client.search("Ossik Tarn", 1)
                break
            except RetrievalError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert [p.id for p in hits] == ["b"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
