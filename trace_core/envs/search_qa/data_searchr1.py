"""Search-R1's processed QA rows (parquet or JSONL) as QA task records for the search_qa env.

Search-R1 (github.com/PeterGriffinJin/Search-R1, scripts/data_process/qa_search_*_merge.py) maps the
FlashRAG datasets (NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, Musique, Bamboogle) to rows like

    {"id": "train_0", "question": "who got the first nobel prize in physics?",
     "golden_answers": ["Wilhelm Conrad Röntgen"], "data_source": "nq",
     "prompt": [{"role": "user", "content": "Answer the given question. ... Question: who got ...?\\n"}],
     "ability": "fact-reasoning",
     "reward_model": {"style": "rule", "ground_truth": {"target": ["Wilhelm Conrad Röntgen"]}},
     "extra_info": {"split": "train", "index": 0}}

and writes them as train.parquet / test.parquet. `load_searchr1` reads such files (.parquet needs
pyarrow; .jsonl / .json lines always work) and keeps, per row:
    question        "question", else the text after the last "Question:" of the prompt's user message
    golden_answers  "golden_answers", else reward_model.ground_truth.target
    id              "id", else "<data_source>-<extra_info.index>", else "<file stem>-<row number>"
    metadata        {"data_source", "split", "index"} where present, plus a row's own "metadata" object
The prompt text of a row is not used: the env formats its own `prompt_template` (SEARCH_R1_PROMPT is
Search-R1's, for configs that want it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trace_core.envs.base import EnvError
from trace_core.envs.search_qa.data import check_qa_task, iter_jsonl, load_qa_jsonl

# Search-R1's "base" template (scripts/data_process/qa_search_train_merge.py: make_prefix), for prompt_template
SEARCH_R1_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)
QA_FORMATS = ("auto", "qa", "searchr1")
_SEARCHR1_FIELDS = ("data_source", "reward_model", "prompt", "extra_info")


def _as_list(value: Any) -> Any:
    """Lists stay lists; numpy arrays and tuples (pandas-read parquet) become lists; other values are kept."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _question_from_prompt(prompt: Any) -> str | None:
    messages = _as_list(prompt)
    if isinstance(messages, str):
        text = messages
    elif isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        text = users[-1] if users and isinstance(users[-1], str) else None
    else:
        return None
    if text is None or "Question:" not in text:
        return None
    return text.rsplit("Question:", 1)[1].strip() or None


def searchr1_row_to_task(row: Any, where: str, fallback_id: str) -> dict[str, Any]:
    """One Search-R1 row as a QA task record (module docstring); EnvError naming `where` otherwise."""
    if not isinstance(row, Mapping):
        raise EnvError(where, f"a Search-R1 row must be an object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        question = _question_from_prompt(row.get("prompt"))
    if question is None:
        raise EnvError(where, "Search-R1 row has no 'question' and no 'Question:' in its prompt")
    golds = _as_list(row.get("golden_answers"))
    if golds is None:
        target = (row.get("reward_model") or {}).get("ground_truth") or {}
        golds = _as_list(target.get("target")) if isinstance(target, Mapping) else None
    if golds is None:
        raise EnvError(where, "Search-R1 row has neither 'golden_answers' nor reward_model.ground_truth.target")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
    source = row.get("data_source")
    metadata: dict[str, Any] = dict(row["metadata"]) if isinstance(row.get("metadata"), Mapping) else {}
    for key, value in (("data_source", source), ("split", extra.get("split")), ("index", extra.get("index"))):
        if value is not None:
            metadata[key] = _as_list(value)
    if row.get("id") is not None:
        task_id = str(row["id"])
    elif source is not None and extra.get("index") is not None:
        task_id = f"{source}-{extra['index']}"
    else:
        task_id = fallback_id
    return check_qa_task({"id": task_id, "question": question, "golden_answers": golds, "metadata": metadata}, where)


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, str, Any]]:
    """(where, fallback id, row) of every row of a .parquet (pyarrow) or JSON-lines file."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise EnvError("path", f"QA data path {str(path)!r} does not exist or is not a file")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EnvError(
                "path",
                f"reading {path.name} needs pyarrow: `pip install pyarrow`, or convert the file to JSONL "
                "(one row per line, e.g. with pandas: df.to_json(path, orient='records', lines=True))",
            ) from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", f"{path.stem}-{i}", row
        return
    for lineno, where, row in iter_jsonl(path, "QA data path"):
        yield where, f"{path.stem}-{lineno}", row


def load_searchr1(
    path: str | os.PathLike,
    *,
    data_sources: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
) -> list[dict[str, Any]]:
    """QA task records of a Search-R1 file; `data_sources` keeps only rows of those sources (e.g.
    ["nq", "hotpotqa"]); `shuffle_seed` shuffles the records (the trainer evaluates the first tasks
    of its eval split, and Search-R1's test file is sorted by source)."""
    keep = None if data_sources is None else {data_sources} if isinstance(data_sources, str) else set(data_sources)
    tasks = []
    for where, fallback_id, row in read_rows(path):
        if keep is not None and (not isinstance(row, Mapping) or row.get("data_source") not in keep):
            continue
        tasks.append(searchr1_row_to_task(row, where, fallback_id))
    if not tasks:
        which = "" if keep is None else f" with data_source in {sorted(keep)}"
        raise EnvError("path", f"QA data path {str(path)!r} holds no rows{which}")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(tasks))
        tasks = [tasks[i] for i in order]
    return tasks


def looks_like_searchr1(path: str | os.PathLike) -> bool:
    """A .parquet file, or JSON lines whose first row has a Search-R1 field (data_source, reward_model, ...)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return True
    for _, _, row in iter_jsonl(path, "QA data path"):
        return isinstance(row, Mapping) and any(k in row for k in _SEARCHR1_FIELDS)
    return False


def load_qa_file(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    data_sources: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
) -> list[dict[str, Any]]:
    """QA task records of a file: format "qa" (data.load_qa_jsonl), "searchr1" (load_searchr1) or "auto"
    (Search-R1 for .parquet files and for JSON lines that carry Search-R1 fields, else "qa")."""
    if format not in QA_FORMATS:
        raise EnvError("format", f"format must be one of {list(QA_FORMATS)}, got {format!r}")
    if format == "searchr1" or (format == "auto" and looks_like_searchr1(path)):
        return load_searchr1(path, data_sources=data_sources, shuffle_seed=shuffle_seed)
    if data_sources is not None:
        raise EnvError("data_sources", "data_sources filters Search-R1 rows; this file is plain QA JSONL")
    tasks = load_qa_jsonl(path)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(tasks))
        tasks = [tasks[i] for i in order]
    return tasks


def to_searchr1_row(task: Mapping[str, Any], data_source: str, split: str, index: int) -> dict[str, Any]:
    """A QA task record as a Search-R1 row (the layout of the module docstring)."""
    golds = list(task["golden_answers"])
    return {
        "id": str(task.get("id", f"{split}_{index}")),
        "question": task["question"],
        "golden_answers": golds,
        "data_source": data_source,
        "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format(question=task["question"])}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
        "extra_info": {"split": split, "index": index},
    }


def write_searchr1_jsonl(
    path: str | os.PathLike, tasks: Sequence[Mapping[str, Any]], data_source: str, split: str
) -> Path:
    """Write QA task records as Search-R1 rows, one JSON object per line."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for i, task in enumerate(tasks):
            handle.write(json.dumps(to_searchr1_row(task, data_source, split, i), ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # python -m trace_core.envs.search_qa.data_searchr1 OUT_DIR [SEED]
    import sys

    from trace_core.envs.search_qa.synthetic import build_world, synthetic_qa_tasks, write_jsonl

    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m trace_core.envs.search_qa.data_searchr1 OUT_DIR [SEED]")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    write_jsonl(out / "corpus.jsonl", world.corpus)
    for split, name in (("train", "train"), ("eval", "test")):
        written = write_searchr1_jsonl(out / f"{name}.jsonl", synthetic_qa_tasks(world, split), "synthetic", name)
        print(f"{name}: {written}")
    print(f"corpus: {out / 'corpus.jsonl'} ({len(world.corpus)} passages)")
