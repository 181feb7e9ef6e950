"""Search-R1 rows -> verl dataset rows with extra_info["trace_task"] (data.py), read back as verl's
agent loop reads them, and the env accepts the task. Needs pyarrow (a verl dependency)."""

from __future__ import annotations

import pytest

pa = pytest.importorskip("pyarrow", reason="needs pyarrow (in the verl venv)")
import pyarrow.parquet as pq  # noqa: E402

from trace_core.envs import make_env  # noqa: E402
from trace_core.envs.base import EnvError  # noqa: E402
from trace_core.envs.search_qa.data_searchr1 import to_searchr1_row  # noqa: E402
from trace_core.integrations.verl import data  # noqa: E402


def search_r1_file(path, sources=("nq", "hotpotqa", "nq")):
    tasks = [
        {"id": f"t{i}", "question": f"who wrote book {i}?", "golden_answers": [f"author {i}"]}
        for i in range(len(sources))
    ]
    rows = [to_searchr1_row(task, source, "train", i) for i, (task, source) in enumerate(zip(tasks, sources))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_rows_gain_trace_task_and_keep_verls_columns(tmp_path):
    rows = search_r1_file(tmp_path / "train.parquet")
    data.main([str(tmp_path / "train.parquet"), str(tmp_path / "verl.parquet"), "--data-sources", "nq"])
    out = pq.read_table(tmp_path / "verl.parquet").to_pylist()
    assert [r["id"] for r in out] == ["t0", "t2"]  # hotpotqa filtered out
    for got, want in zip(out, (rows[0], rows[2])):
        assert got["prompt"] == want["prompt"] and got["reward_model"] == want["reward_model"]
        assert got["extra_info"]["split"] == "train" and got["extra_info"]["index"] == want["extra_info"]["index"]
        task = got["extra_info"]["trace_task"]
        assert task["question"] == want["question"] and task["golden_answers"] == want["golden_answers"]
        env = make_env("search_qa")  # the synthetic world's retriever; the task is what reset takes
        assert "who wrote book" in env.reset(task)


def test_a_row_that_is_not_qa_names_the_row(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"data_source": "nq", "prompt": [{"role": "user", "content": "hi"}]}]),
        tmp_path / "bad.parquet",
    )
    with pytest.raises(EnvError, match=r"bad.parquet\[0\]"):
        data.verl_rows(tmp_path / "bad.parquet")
