"""Search-R1-style multi-hop QA: the policy searches a corpus, reads passages, answers.

Turn protocol (tags as in Search-R1):
    action       free text (reasoning allowed) containing either
                 <search> query </search>   -> observation "\\n<information>Doc 1: ...\\nDoc 2: ...</information>\\n"
                 <answer> text </answer>    -> the episode ends; reward from the answer
Action parsing (`parse_search_action`):
    - if the action holds a complete <answer>...</answer>, it is final and the LAST one counts
      (even if a <search> block is present too);
    - else the FIRST complete <search>...</search> is run (engines stop a turn at </search>);
    - else, or when the query is empty after stripping, the action is invalid.
Invalid actions follow `on_invalid` (base.INVALID_ACTION_POLICIES): "continue" (default) uses the
turn and returns an observation saying how to act; "end" ends the episode with reward 0.
Retrieval with no match: "<information>No results found.</information>", episode goes on.
Tool failure (the retriever raised, even SystemExit, exceeded `tool_timeout_s`, or returned something
other than a list of passages): "<information>Search failed: <reason></information>",
info["tool_error"] is set, episode goes on; the turn counts. `tool_timeout_s` None or inf: no limit.
Turn limit: a turn that is not an answer, taken when `max_turns` turns are used up, ends the
episode with reward 0 (info["end_reason"] == "turn_limit").
Reward (`reward`): "f1_hit" (default, the paper's criterion) -> 1 if the best token F1 against the gold
answers is >= `f1_threshold` (default 0.3, the paper's); "em" -> 1 if the normalised answer equals a
normalised gold answer; "f1" -> the best token F1 itself, in [0, 1]. Whatever the reward, the final
step's info holds all three metrics the paper reports: info["em"], info["f1"] and info["f1_hit"] (F1 >=
0.3), and evaluation averages them (`eval_metrics`).

The env is deterministic (stateless retrieval), so `restore(..., seed=...)` accepts a seed for
protocol compatibility and it has no effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trace_core.envs.base import (
    INVALID_ACTION_POLICIES,
    EnvError,
    EpisodeStateError,
    Step,
    check_choice,
    check_positive_int,
    check_seed,
)
from trace_core.envs.search_qa.data import check_qa_task
from trace_core.envs.search_qa.metrics import exact_match, token_f1
from trace_core.envs.search_qa.retriever import Passage, Retriever
from trace_core.envs.tools import ToolTimeout, call_with_timeout

DEFAULT_PROMPT = (
    "Answer the question below. Think before each step. To look something up, write "
    "<search> your query </search>; the results will appear between <information> and </information>. "
    "You may search several times. When you know the answer, write only the answer between <answer> and "
    "</answer>, for example <answer> Lisbon </answer>.\nQuestion: {question}\n"
)
INVALID_OBSERVATION = (
    "\nInvalid action: write <search> query </search> to search, or <answer> text </answer> to give the final answer.\n"
)


def _blocks(text: str, tag: str, *, first_only: bool = False) -> list[str]:
    """Contents of the complete <tag>...</tag> blocks, as re.findall(r"<tag>(.*?)</tag>", DOTALL)
    gives them, in linear time: the regex retries from every opening tag and is quadratic on
    "<tag>" * n (parsing runs outside the tool timeout, on text the policy wrote)."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    found, pos = [], 0
    while (start := text.find(opening, pos)) >= 0:
        stop = text.find(closing, start + len(opening))
        if stop < 0:  # no later opening tag can be closed either
            break
        found.append(text[start + len(opening) : stop])
        if first_only:
            break
        pos = stop + len(closing)
    return found


def parse_search_action(text: str) -> tuple[str | None, str | None, str | None]:
    """(kind, argument, invalid_reason): kind "answer" or "search", or None with a reason."""
    if not isinstance(text, str):
        return None, None, f"action must be text, got {type(text).__name__}"
    answers = _blocks(text, "answer")
    if answers:
        return "answer", answers[-1].strip(), None
    search = _blocks(text, "search", first_only=True)
    if not search:
        return None, None, "no complete <search>...</search> or <answer>...</answer> block"
    query = search[0].strip()
    if not query:
        return None, None, "empty search query"
    return "search", query, None


def render_passages(passages: list[Passage]) -> str:
    if not passages:
        return "\n<information>No results found.</information>\n"
    lines = [f"Doc {i}: " + " ".join(p.contents.split()) for i, p in enumerate(passages, 1)]
    return "\n<information>" + "\n".join(lines) + "</information>\n"


REWARDS = ("f1_hit", "em", "f1")
PAPER_F1_THRESHOLD = 0.3  # the paper counts an answer with token F1 >= 0.3 as correct


class SearchQAEnv:
    """Env protocol implementation for search-augmented QA (module docstring has the rules)."""

    eval_metrics = ("em", "f1", "f1_hit")  # final-step info keys that evaluation averages

    def __init__(
        self,
        retriever: Retriever,
        *,
        top_k: int = 3,
        max_turns: int = 5,
        reward: str = "f1_hit",
        f1_threshold: float = PAPER_F1_THRESHOLD,
        on_invalid: str = "continue",
        tool_timeout_s: float | None = 10.0,
        prompt_template: str = DEFAULT_PROMPT,
    ):
        if not callable(getattr(retriever, "search", None)):
            raise EnvError(
                "retriever", f"retriever must have a search(query, k) method, got {type(retriever).__name__}"
            )
        self.retriever = retriever
        self.top_k = check_positive_int("top_k", top_k)
        self.max_turns = check_positive_int("max_turns", max_turns)
        check_choice("reward", reward, REWARDS)
        self.reward_mode = reward
        if not 0.0 < f1_threshold <= 1.0:
            raise EnvError("f1_threshold", f"f1_threshold must be in (0, 1], got {f1_threshold!r}")
        self.f1_threshold = f1_threshold
        check_choice("on_invalid", on_invalid, INVALID_ACTION_POLICIES)
        self.on_invalid = on_invalid
        if tool_timeout_s is not None and not tool_timeout_s > 0:
            raise EnvError("tool_timeout_s", f"tool_timeout_s must be > 0 or None, got {tool_timeout_s!r}")
        self.tool_timeout_s = tool_timeout_s
        if "{question}" not in prompt_template:
            raise EnvError("prompt_template", "prompt_template must contain the placeholder {question}")
        self.prompt_template = prompt_template
        self._task: dict[str, Any] | None = None
        self._prefetched: tuple[str, Any] | None = None  # (query, its search outcome), set by step_batch

    # --- protocol ---------------------------------------------------------------------------
    def reset(self, task: Mapping[str, Any], *, seed: int | None = None) -> str:
        check_seed(seed)
        self._task = check_qa_task(task)
        self.turn, self.done, self.reward = 0, False, None
        self.searches: list[str] = []
        return self.prompt_template.format(question=self._task["question"])

    def step(self, action: str) -> Step:
        if self._task is None:
            raise EpisodeStateError("SearchQAEnv: call reset(task) (or restore) before step")
        if self.done:
            raise EpisodeStateError("SearchQAEnv: the episode is over; reset or restore before stepping again")
        self.turn += 1
        kind, argument, reason = parse_search_action(action)
        info: dict[str, Any] = {"turn": self.turn, "action": kind}
        if kind == "answer":
            return self._score(argument, info)
        if kind is None:
            info["invalid_reason"] = reason
            if self.on_invalid == "end":
                return self._finish(0.0, "invalid_action", info)
        else:
            info["query"] = argument
        if self.turn >= self.max_turns:
            return self._finish(0.0, "turn_limit", info)
        if kind is None:
            return Step(INVALID_OBSERVATION, False, None, info)
        self.searches.append(argument)
        return Step(self._search(argument, info), False, None, info)

    @staticmethod
    def step_batch(envs: Sequence[SearchQAEnv], actions: Sequence[str]) -> list[Step]:
        """One decode round's turns (the engine calls this through `envs.base.step_all`): when the envs
        share a retriever with `search_many` (the Search-R1 HTTP client), every search of the round goes
        out in one call -- one request to the server -- under one tool timeout, with the same timeout
        and error handling as a single search; the rest of each step is `step`'s."""
        retriever = envs[0].retriever if envs else None
        many = getattr(retriever, "search_many", None)
        if many is not None and all(env.retriever is retriever for env in envs):
            wanted = {i: q for i, (env, a) in enumerate(zip(envs, actions)) if (q := env._search_query(a)) is not None}
            if wanted:
                queries = list(wanted.values())
                try:
                    results, seconds = call_with_timeout(many, queries, envs[0].top_k, timeout_s=envs[0].tool_timeout_s)
                    if not isinstance(results, list) or len(results) != len(queries):
                        raise ValueError(f"search_many returned {type(results).__name__} for {len(queries)} queries")
                    outcomes: list[Any] = [(r, seconds) for r in results]
                except Exception as exc:  # the whole round's searches failed alike
                    outcomes = [exc] * len(queries)
                for i, outcome in zip(wanted, outcomes):
                    envs[i]._prefetched = (wanted[i], outcome)
        return [env.step(action) for env, action in zip(envs, actions)]

    def _search_query(self, action: str) -> str | None:
        """The query `step(action)` would send to the retriever now, or None (answer, invalid, turn limit)."""
        if self._task is None or self.done or self.turn + 1 >= self.max_turns:
            return None
        kind, argument, _ = parse_search_action(action)
        return argument if kind == "search" else None

    def snapshot(self) -> dict[str, Any]:
        if self._task is None:
            raise EpisodeStateError("SearchQAEnv: nothing to snapshot before reset")
        return {
            "task": dict(self._task),
            "turn": self.turn,
            "done": self.done,
            "reward": self.reward,
            "searches": list(self.searches),
        }

    def restore(self, snapshot: Any, *, seed: int | None = None) -> None:
        if not isinstance(snapshot, Mapping) or not {"task", "turn", "done", "searches"} <= set(snapshot):
            raise EnvError("snapshot", "snapshot must be a value returned by SearchQAEnv.snapshot()")
        check_seed(seed)
        self._task = check_qa_task(snapshot["task"])
        self.turn, self.done, self.reward = snapshot["turn"], snapshot["done"], snapshot.get("reward")
        self.searches = list(snapshot["searches"])

    # --- helpers ----------------------------------------------------------------------------
    def _search(self, query: str, info: dict[str, Any]) -> str:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == query:
            outcome = prefetched[1]  # fetched with the round's other searches (step_batch)
        else:
            try:
                outcome = call_with_timeout(self.retriever.search, query, self.top_k, timeout_s=self.tool_timeout_s)
            except Exception as exc:  # ToolTimeout, and ToolError (a SystemExit inside the tool), included
                outcome = exc
        if isinstance(outcome, ToolTimeout):
            info["tool_error"] = f"timeout after {self.tool_timeout_s} s"
            return f"\n<information>Search failed: timed out after {self.tool_timeout_s} s.</information>\n"
        if isinstance(outcome, Exception):
            info["tool_error"] = f"{type(outcome).__name__}: {outcome}"
            return f"\n<information>Search failed: {type(outcome).__name__}.</information>\n"
        passages, seconds = outcome
        info["tool_seconds"] = seconds
        passages, problem = _checked_passages(passages)
        if problem is not None:
            info["tool_error"] = f"malformed retriever output: {problem}"
            return "\n<information>Search failed: the retriever returned malformed output.</information>\n"
        info["retrieved_ids"] = [p.id for p in passages]
        return render_passages(passages[: self.top_k])

    def _score(self, answer: str, info: dict[str, Any]) -> Step:
        golds = self._task["golden_answers"]
        info["answer"] = answer
        info["em"] = exact_match(answer, golds)
        info["f1"] = token_f1(answer, golds)
        info["f1_hit"] = info["f1"] >= PAPER_F1_THRESHOLD
        if self.reward_mode == "f1":
            return self._finish(float(info["f1"]), "answer", info)
        correct = info["em"] if self.reward_mode == "em" else info["f1"] >= self.f1_threshold
        return self._finish(1.0 if correct else 0.0, "answer", info)

    def _finish(self, reward: float, reason: str, info: dict[str, Any]) -> Step:
        self.done, self.reward = True, reward
        info["end_reason"] = reason
        return Step("", True, reward, info)


def _checked_passages(result: Any) -> tuple[list[Passage], str | None]:
    """(passages, None) when `result` is a list or tuple of passages (objects with a string `contents`
    and an `id`), else ([], what is wrong): a retriever is user code, its output is not trusted."""
    if not isinstance(result, (list, tuple)):
        return [], f"expected a list of Passage, got {type(result).__name__}"
    for i, passage in enumerate(result):
        if not isinstance(getattr(passage, "contents", None), str) or not hasattr(passage, "id"):
            return [], f"item {i} is a {type(passage).__name__}, not a Passage (id, contents: str)"
    return list(result), None
