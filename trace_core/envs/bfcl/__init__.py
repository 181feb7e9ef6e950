"""BFCL v4 multi-turn function calling (registered as "bfcl"), on the data and API simulators of `bfcl-eval`.

- data.py     the wheel's multi-turn entries, ground truth and function docs (read as files, the package
              is not imported), `BFCLTaskSource`: 80/20 train/eval split by scenario over the four subsets
- calls.py    parsing the model's calls (Python list syntax or <tool_call> JSON, via `ast` / `json`, no
              eval), running them on the simulator instances
- checker.py  BFCL's multi-turn checker reimplemented (states and call results per user turn)
- env.py      `BFCLEnv`: user turns, call steps, prompts, snapshot / restore, reward

Install the data and simulators with `pip install --no-deps bfcl-eval==2026.3.23` (its declared
dependencies are heavy and pin an old numpy; the env needs none of them). This package re-exports
nothing, so importing it never needs bfcl-eval.
"""
