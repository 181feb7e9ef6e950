"""Search-R1's processed QA rows as verl RL-dataset rows for the `trace_agent` loop.

    python -m trace_core.integrations.verl.data IN.parquet|IN.jsonl OUT.parquet [--data-sources nq,hotpotqa]

verl's `RLHFDataset` reads a parquet file with a `prompt` (chat messages) column and passes
`extra_info` to the agent loop; `trace_agent` reads the env's task record from
`extra_info["trace_task"]`. Search-R1's rows already have verl's columns (`prompt`, `data_source`,
`reward_model`, `extra_info`: Search-R1 is a verl fork); this adds `trace_task` (id, question,
golden_answers, metadata: `searchr1_row_to_task`) and keeps everything else. The `search_qa` env
formats its own prompt from the question (its `prompt_template`); the row's `prompt` is what verl's
dataset filters by length.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from typing import Any

from trace_core.envs.search_qa.data_searchr1 import read_rows, searchr1_row_to_task


def verl_rows(path: str | os.PathLike, data_sources: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a Search-R1 file with `extra_info["trace_task"]` added (only `data_sources`' rows
    when given); EnvError naming the row for a row that is not a QA row."""
    wanted = set(data_sources) if data_sources else None
    rows = []
    for where, fallback_id, row in read_rows(path):
        if wanted is not None and row.get("data_source") not in wanted:
            continue
        task = searchr1_row_to_task(row, where, fallback_id)
        extra = dict(row["extra_info"]) if isinstance(row.get("extra_info"), Mapping) else {}
        rows.append({**row, "extra_info": {**extra, "trace_task": task}})
    return rows


def write_parquet(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="Search-R1 train.parquet / test.parquet (or .jsonl)")
    parser.add_argument("output", help="verl dataset .parquet to write")
    parser.add_argument("--data-sources", default=None, help="comma-separated data_source values to keep")
    args = parser.parse_args(argv)
    sources = args.data_sources.split(",") if args.data_sources else None
    rows = verl_rows(args.input, sources)
    write_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
