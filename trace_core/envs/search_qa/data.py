"""QA task records: the Search-R1 / FlashRAG JSONL format and the FanOutQA dev set.

A QA task record (what SearchQAEnv.reset takes):
    {"id": str, "question": str, "golden_answers": [str, ...], "metadata": {...}}   (metadata optional)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from trace_core.envs.base import EnvError

FANOUTQA_DEV_FILE = "fanoutqa/data/fanout-final-dev.json"


def check_qa_task(record: Any, where: str = "task") -> dict[str, Any]:
    """Validate a QA record; returns a normalised copy. EnvError naming the field otherwise."""
    if not isinstance(record, Mapping):
        raise EnvError(where, f"a QA record must be a JSON object / mapping, got {type(record).__name__}")
    question = record.get("question")
    if "question" not in record:
        raise EnvError(where, "QA record is missing the field 'question'")
    if not isinstance(question, str) or not question.strip():
        raise EnvError(where, f"QA field 'question' must be a non-empty string, got {question!r}")
    if "golden_answers" not in record:
        raise EnvError(where, "QA record is missing the field 'golden_answers'")
    golds = record["golden_answers"]
    if isinstance(golds, str):
        golds = [golds]
    if (
        not isinstance(golds, (list, tuple))
        or not golds
        or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in golds)
    ):
        raise EnvError(where, f"QA field 'golden_answers' must be a non-empty list of strings, got {golds!r}")
    meta = record.get("metadata", {})
    if not isinstance(meta, Mapping):
        raise EnvError(where, f"QA field 'metadata' must be an object, got {type(meta).__name__}")
    return {
        "id": str(record.get("id", where)),
        "question": question,
        "golden_answers": [str(g) for g in golds],
        "metadata": dict(meta),
    }


def iter_jsonl(path: str | os.PathLike, name: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, "path:line", parsed value) of each non-blank line of a JSONL file; EnvError
    naming `name` if the file is missing and the line if it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise EnvError(name, f"{name} {str(path)!r} does not exist or is not a file")
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EnvError(f"{path}:{lineno}", f"not valid JSON ({exc.msg})") from None
            yield lineno, f"{path}:{lineno}", value


def load_qa_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read QA records from JSONL (one object per line; blank lines skipped)."""
    path = Path(path)
    records = []
    for lineno, where, raw in iter_jsonl(path, "QA data path"):
        record = check_qa_task(raw, where)
        if "id" not in raw:
            record["id"] = f"{path.stem}-{lineno}"
        records.append(record)
    if not records:
        raise EnvError("path", f"QA data path {str(path)!r} holds no records")
    return records


def write_jsonl(path: str | os.PathLike, records: list[Mapping[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- FanOutQA ------------------------------------------------------------------------------------


def answer_to_text(answer: Any) -> str:
    """One string for a FanOutQA answer (primitive, list or dict), as the dataset's own string metrics do."""
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    if isinstance(answer, list):
        return "\n".join(answer_to_text(a) for a in answer)
    if isinstance(answer, dict):
        return "\n".join(f"{k} - {answer_to_text(v)}" for k, v in answer.items())
    return "" if answer is None else str(answer)


def answer_strings(answer: Any) -> list[str]:
    """Every primitive answer string inside a FanOutQA answer (dict keys and values, list items)."""
    if isinstance(answer, list):
        return [s for a in answer for s in answer_strings(a)]
    if isinstance(answer, dict):
        return [s for k, v in answer.items() for s in (*answer_strings(k), *answer_strings(v))]
    return [answer_to_text(answer)]


def fanoutqa_dev_path() -> Path:
    """Where the installed `fanoutqa` wheel keeps its dev questions (found without importing it:
    importing fanoutqa opens an HTTP client and needs spacy, none of which the data needs)."""
    try:
        dist = importlib_metadata.distribution("fanoutqa")
    except importlib_metadata.PackageNotFoundError:
        raise EnvError(
            "path",
            "the fanoutqa package is not installed: `pip install fanoutqa` (or the "
            "trace-rl[fanoutqa] extra), or pass path= to a fanout-final-dev.json file",
        ) from None
    path = Path(str(dist.locate_file(FANOUTQA_DEV_FILE)))
    if not path.is_file():
        raise EnvError("path", f"the installed fanoutqa package has no {FANOUTQA_DEV_FILE}; pass path= explicitly")
    return path


def load_fanoutqa_dev(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """FanOutQA dev questions as QA task records.

    path None reads the file shipped in the fanoutqa wheel. The file is a JSON list of
    {"id", "question", "answer", "categories", "decomposition"}; `answer` may be a string, number,
    bool, list or dict. golden_answers holds one string (answer_to_text), so reward="f1" suits
    list/dict answers; metadata keeps the raw answer, every answer string, the categories and
    the number of human-written sub-questions.
    """
    path = fanoutqa_dev_path() if path is None else Path(path)
    if not path.is_file():
        raise EnvError("path", f"path {str(path)!r} does not exist or is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EnvError(path, f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise EnvError(path, f"expected a JSON list of questions, got {type(data).__name__}")
    tasks = []
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise EnvError(where, "a FanOutQA question must be an object")
        for name in ("id", "question", "answer"):
            if name not in item:
                raise EnvError(where, f"FanOutQA question is missing the field {name!r}")
        record = {
            "id": str(item["id"]),
            "question": item["question"],
            "golden_answers": [answer_to_text(item["answer"])],
            "metadata": {
                "source": "fanoutqa-dev",
                "answer": item["answer"],
                "answer_strings": answer_strings(item["answer"]),
                "categories": list(item.get("categories", [])),
                "num_subquestions": len(item.get("decomposition", [])),
            },
        }
        tasks.append(check_qa_task(record, where))
    return tasks
