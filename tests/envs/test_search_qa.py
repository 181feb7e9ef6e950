"""Search QA env: parsing policy, retrieval, tool failures, turn limit, rewards, resume, data loaders."""

import json
import math
import pickle
import random
import re
import threading
import time

import pytest

from trace_core.envs.base import Env, EnvError, EpisodeStateError
from trace_core.envs.search_qa.data import answer_strings, answer_to_text, load_fanoutqa_dev, load_qa_jsonl
from trace_core.envs.search_qa.env import INVALID_OBSERVATION, SearchQAEnv, parse_search_action
from trace_core.envs.search_qa.metrics import exact_match, normalize_answer, token_f1
from trace_core.envs.search_qa.policies import ChainFollowerPolicy
from trace_core.envs.search_qa.retriever import BM25Retriever, Passage, bm25_from_file, load_corpus
from trace_core.envs.search_qa.sources import QATaskSource, make_search_qa_env
from trace_core.envs.search_qa.synthetic import QUESTIONS, build_world, synthetic_qa_tasks, write_synthetic_qa
from trace_core.envs.tools import MAX_TOOL_THREADS, ToolError, ToolTimeout, call_with_timeout

CORPUS = [
    {"id": "a", "contents": '"Velmora"\nVelmora is a city in Dranthia.'},
    {"id": "b", "contents": '"Ossik Tarn"\nOssik Tarn was born in Velmora.'},
    {"id": "c", "contents": '"Dranthia"\nThe currency of Dranthia is the quill.'},
]
TASK = {"id": "q1", "question": "In which country was Ossik Tarn born?", "golden_answers": ["Dranthia"]}


def run_episode(env, task, policy):
    obs = env.reset(task)
    while True:
        step = env.step(policy.act(obs))
        obs = step.observation
        if step.done:
            return step


@pytest.fixture(scope="module")
def env():
    return SearchQAEnv(BM25Retriever(CORPUS), top_k=2, max_turns=3)


def test_protocol_and_prompt(env):
    assert isinstance(env, Env)
    prompt = env.reset(TASK)
    assert prompt.endswith("Question: In which country was Ossik Tarn born?\n") and "<search>" in prompt


@pytest.mark.parametrize(
    "text,kind,arg",
    [
        ("think <search> Ossik Tarn </search>", "search", "Ossik Tarn"),
        ("<search>a</search> then <search>b</search>", "search", "a"),
        ("<answer> x </answer> and <answer>The Y.</answer>", "answer", "The Y."),
        ("<search>q</search><answer>z</answer>", "answer", "z"),
        ("<answer></answer>", "answer", ""),
        ("<search>   </search>", None, None),
        ("<search> unterminated", None, None),
        ("just text", None, None),
    ],
)
def test_action_parser_policy(text, kind, arg):
    got_kind, got_arg, reason = parse_search_action(text)
    assert (got_kind, got_arg) == (kind, arg)
    assert (reason is None) == (kind is not None)


def test_search_then_answer_rewards_exact_match(env):
    env.reset(TASK)
    step = env.step("<search> Ossik Tarn </search>")
    assert not step.done and step.info["retrieved_ids"][0] == "b"
    assert step.observation.startswith('\n<information>Doc 1: "Ossik Tarn" Ossik Tarn was born in Velmora.')
    step = env.step("<answer> the dranthia. </answer>")
    assert step.done and step.reward == 1.0 and step.info["em"] and step.info["end_reason"] == "answer"
    env.reset(TASK)
    assert env.step("<answer>Velmora</answer>").reward == 0.0


def test_empty_retrieval_is_reported_and_episode_goes_on(env):
    env.reset(TASK)
    step = env.step("<search> zeppelin harmonica </search>")
    assert not step.done and step.observation == "\n<information>No results found.</information>\n"
    assert step.info["retrieved_ids"] == []
    assert not env.step("<search> the of and </search>").done  # stop words only: empty query after tokenising


class ExplodingRetriever:
    def search(self, query, k):
        raise RuntimeError("index offline")


class SlowRetriever:
    def search(self, query, k):
        time.sleep(1.0)
        return [Passage("x", "late", 1.0)]


def test_tool_exception_and_timeout_are_observations():
    env = SearchQAEnv(ExplodingRetriever())
    env.reset(TASK)
    step = env.step("<search> x </search>")
    assert not step.done and "Search failed: RuntimeError" in step.observation
    assert step.info["tool_error"] == "RuntimeError: index offline"
    env = SearchQAEnv(SlowRetriever(), tool_timeout_s=0.05)
    env.reset(TASK)
    step = env.step("<search> x </search>")
    assert not step.done and "timed out" in step.observation and step.info["tool_error"].startswith("timeout")


class BlockedRetriever:
    """Blocks until released: a tool that hangs (a spinning one holds its thread the same way)."""

    def __init__(self):
        self.release = threading.Event()

    def search(self, query, k):
        self.release.wait(30)
        return [Passage("x", "late", 1.0)]


class ScriptedRetriever:
    def __init__(self, result):
        self.result = result

    def search(self, query, k):
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def test_infinite_tool_timeout_means_no_limit():
    # issue 19: tool_timeout_s=inf made every search fail (thread.join(inf) overflows)
    env = SearchQAEnv(BM25Retriever(CORPUS), tool_timeout_s=math.inf)
    env.reset(TASK)
    step = env.step("<search> Ossik Tarn </search>")
    assert "tool_error" not in step.info and "Ossik Tarn was born" in step.observation
    for timeout in (math.inf, 1e300, None):
        assert call_with_timeout(lambda x: x + 1, 1, timeout_s=timeout)[0] == 2
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            call_with_timeout(print, timeout_s=bad)
    with pytest.raises(EnvError, match="tool_timeout_s"):
        SearchQAEnv(BM25Retriever(CORPUS), tool_timeout_s=math.nan)


def test_timed_out_tool_calls_cannot_leak_threads():
    # issue 19: 52 timeouts left 53 threads alive (each timed-out call kept its own thread forever)
    retriever = BlockedRetriever()
    env = SearchQAEnv(retriever, tool_timeout_s=0.01, max_turns=100)
    env.reset(TASK)
    before = threading.active_count()
    try:
        for _ in range(52):
            step = env.step("<search> x </search>")
            assert "Search failed: timed out" in step.observation and step.info["tool_error"].startswith("timeout")
        assert threading.active_count() <= before + MAX_TOOL_THREADS
        with pytest.raises(ToolTimeout, match=f"no free tool worker .*all {MAX_TOOL_THREADS} are still running"):
            call_with_timeout(retriever.search, "x", 1, timeout_s=0.01)
    finally:
        retriever.release.set()
    # the hung calls return, their workers finish and the slots come back
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before
    assert call_with_timeout(lambda: 7, timeout_s=1.0)[0] == 7


@pytest.mark.parametrize(
    "result",
    [None, {"id": "a", "contents": "x"}, [{"id": "a", "contents": "x"}], ["text"], [Passage("a", None, 1.0)], 3],
)
def test_malformed_retriever_output_is_an_observation(result):
    # issue 19: a retriever returning None or dicts crashed the env
    env = SearchQAEnv(ScriptedRetriever(result))
    env.reset(TASK)
    step = env.step("<search> x </search>")
    assert not step.done and "Search failed: the retriever returned malformed output" in step.observation
    assert step.info["tool_error"].startswith("malformed retriever output")
    assert env.step("<answer> Dranthia </answer>").reward == 1.0  # the episode goes on


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_system_exit_in_a_tool_is_an_observation(timeout):
    # issue 19: SystemExit from a tool ended the process
    env = SearchQAEnv(ScriptedRetriever(SystemExit(3)), tool_timeout_s=timeout)
    env.reset(TASK)
    step = env.step("<search> x </search>")
    assert not step.done and "Search failed: ToolError" in step.observation
    assert "SystemExit(3)" in step.info["tool_error"]
    with pytest.raises(ToolError, match=r"raised SystemExit\(3\)"):
        call_with_timeout(ScriptedRetriever(SystemExit(3)).search, "x", 1, timeout_s=timeout)
    with pytest.raises(KeyError):  # ordinary exceptions are re-raised unchanged
        call_with_timeout(ScriptedRetriever(KeyError("k")).search, "x", 1, timeout_s=timeout)


def test_action_parsing_is_linear_time():
    # issue 19: the regexes retried from every opening tag: "<search>" * n took 22 s at 128 KB
    for text in ("<search>" * 131_072, "<answer>" * 131_072, "<search>" * 131_072 + "</search>", "<" * 10**6):
        start = time.perf_counter()
        parse_search_action(text)
        assert time.perf_counter() - start < 5.0
    start = time.perf_counter()
    assert parse_search_action("<search>" * 131_072)[0] is None  # 1 MB
    assert parse_search_action("<answer>" * 131_072 + "</answer>") == ("answer", "<answer>" * 131_071, None)
    assert time.perf_counter() - start < 5.0


def test_action_parsing_equals_the_regex_definition():
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<answer>", "</answer>", " q ", "<", "search>", "x"]
    answer_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    search_re = re.compile(r"<search>(.*?)</search>", re.DOTALL)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        answers, search = answer_re.findall(text), search_re.search(text)
        if answers:
            want = ("answer", answers[-1].strip())
        elif search and search.group(1).strip():
            want = ("search", search.group(1).strip())
        else:
            want = (None, None)
        assert parse_search_action(text)[:2] == want, text


def test_corpus_of_only_stop_words_is_refused_naming_the_corpus():
    # issue 19: bm25s failed inside with "max() arg is an empty sequence"
    for contents in (["the and of", "is it"], ["", "  "]):
        with pytest.raises(EnvError, match="corpus: no passage of the corpus has a searchable term") as info:
            BM25Retriever([{"id": str(i), "contents": c} for i, c in enumerate(contents)])
        assert info.value.field == "corpus"
    kept = BM25Retriever([{"id": "a", "contents": "the and of"}], stopwords=None)
    assert [p.id for p in kept.search("of", 1)] == ["a"]


def test_invalid_actions_and_turn_limit(env):
    env.reset(TASK)
    step = env.step("I am not sure")
    assert not step.done and step.observation == INVALID_OBSERVATION and env.turn == 1
    assert step.info["invalid_reason"].startswith("no complete")
    env.step("<search> Velmora </search>")
    step = env.step("<search> Dranthia </search>")  # third turn of max_turns=3, not an answer
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "turn_limit" and step.observation == ""
    with pytest.raises(EpisodeStateError, match="episode is over"):
        env.step("<answer> Dranthia </answer>")
    strict = SearchQAEnv(BM25Retriever(CORPUS), on_invalid="end")
    strict.reset(TASK)
    step = strict.step("<search></search>")
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "invalid_action"


def test_answer_on_the_last_turn_still_counts(env):
    env.reset(TASK)
    env.step("<search> Ossik Tarn </search>")
    env.step("<search> Velmora </search>")
    assert env.step("<answer>Dranthia</answer>").reward == 1.0


def test_f1_reward_option():
    task = {"question": "Who?", "golden_answers": ["Ossik Tarn of Velmora"]}
    lenient = SearchQAEnv(BM25Retriever(CORPUS), reward="f1_hit", f1_threshold=0.8)
    lenient.reset(task)
    step = lenient.step("<answer>Ossik Tarn, Velmora</answer>")
    assert step.reward == 1.0 and not step.info["em"] and step.info["f1"] == pytest.approx(6 / 7)
    strict = SearchQAEnv(BM25Retriever(CORPUS), reward="em")
    strict.reset(task)
    assert strict.step("<answer>Ossik Tarn, Velmora</answer>").reward == 0.0


def test_qa_rewards_default_to_the_papers_criterion_and_report_all_three_metrics():
    """The paper counts F1 >= 0.3 as correct and reports EM and F1: the default reward is that hit,
    "f1" rewards the token F1 itself, and the last step's info always carries em, f1 and f1_hit."""
    task = {"question": "Who?", "golden_answers": ["Ossik Tarn of Velmora"]}
    answer = "<answer>Tarn clan members here</answer>"  # 1 of 4 answer tokens, 1 of 4 gold tokens: F1 = 0.25
    steps = {}
    for reward in (None, "f1", "em"):
        env = SearchQAEnv(BM25Retriever(CORPUS), **({} if reward is None else {"reward": reward}))
        env.reset(task)
        steps[reward] = env.step(answer)
    f1 = steps[None].info["f1"]
    assert 0 < f1 < 0.3 and steps[None].reward == 0.0 and steps["f1"].reward == pytest.approx(f1)
    assert all(set(s.info) >= {"em", "f1", "f1_hit"} and not s.info["f1_hit"] for s in steps.values())
    env = SearchQAEnv(BM25Retriever(CORPUS))
    env.reset(task)
    hit = env.step("<answer>Tarn of Velmora</answer>")
    assert hit.reward == 1.0 and hit.info["f1_hit"] and not hit.info["em"]
    assert SearchQAEnv.eval_metrics == ("em", "f1", "f1_hit")


def test_metrics():
    assert normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert exact_match("an apple", ["Apple", "pear"]) and not exact_match("apples", ["apple"])
    assert token_f1("red apple", ["apple"]) == pytest.approx(2 / 3)
    assert token_f1("", ["apple"]) == 0.0 and token_f1("a", ["the"]) == 0.0


def untimed(step):
    return step.observation, step.done, step.reward, {k: v for k, v in step.info.items() if k != "tool_seconds"}


def test_restore_equals_replaying_the_prefix(env):
    actions = ["<search> Ossik Tarn </search>", "<search> Velmora </search>", "<answer> Dranthia </answer>"]
    env.reset(TASK)
    first = untimed(env.step(actions[0]))
    snap = pickle.loads(pickle.dumps(env.snapshot()))
    rest = [untimed(env.step(a)) for a in actions[1:]]
    assert rest[-1][2] == 1.0
    other = SearchQAEnv(BM25Retriever(CORPUS), top_k=2, max_turns=3)
    other.reset({"question": "something else?", "golden_answers": ["x"]})
    other.restore(snap, seed=99)  # seed accepted; this env has no randomness
    assert other.turn == 1 and other.searches == ["Ossik Tarn"]
    assert [untimed(other.step(a)) for a in actions[1:]] == rest
    env.reset(TASK)
    assert [untimed(env.step(a)) for a in actions] == [first, *rest]
    with pytest.raises(EnvError, match="snapshot"):
        other.restore({"turn": 1})
    with pytest.raises(EnvError, match="seed"):
        other.restore(snap, seed=1.5)
    with pytest.raises(EnvError, match="seed"):
        other.reset(TASK, seed="x")


def test_synthetic_world_scripted_policy_solves_every_question():
    env = make_search_qa_env()
    source = QATaskSource()
    for split in ("train", "eval"):
        tasks = source.tasks(split)
        rewards = [run_episode(env, task, ChainFollowerPolicy(task)).reward for task in tasks]
        assert sum(rewards) == len(tasks), split
    train_people = {t["metadata"]["start"] for t in source.tasks("train")}
    assert not train_people & {t["metadata"]["start"] for t in source.tasks("eval")}


class OneHopPolicy(ChainFollowerPolicy):
    """Answers right after the first hop: must fail on every multi-hop question."""

    def act(self, observation):
        action = super().act(observation)
        return f"<answer> {self.entity} </answer>" if self.hop >= 1 else action


def test_synthetic_questions_really_need_every_hop():
    world = build_world(3, num_people=20)
    tasks = synthetic_qa_tasks(world, "eval")
    assert {t["metadata"]["hops"] for t in tasks} == {2, 3}
    assert len(tasks) == len(QUESTIONS) * 4
    env = SearchQAEnv(BM25Retriever(world.corpus))
    assert sum(run_episode(env, t, OneHopPolicy(t)).reward for t in tasks) == 0
    assert sum(run_episode(env, t, ChainFollowerPolicy(t)).reward for t in tasks) == len(tasks)


def test_synthetic_files_round_trip(tmp_path):
    paths = write_synthetic_qa(tmp_path, seed=1, num_people=10)
    corpus = load_corpus(paths["corpus"])
    train = load_qa_jsonl(paths["train"])
    assert corpus == build_world(1, num_people=10).corpus
    assert train == synthetic_qa_tasks(build_world(1, num_people=10), "train")
    env = make_search_qa_env(corpus_path=str(paths["corpus"]))
    assert bm25_from_file(paths["corpus"]) is env.retriever  # indexed once per file
    assert run_episode(env, train[0], ChainFollowerPolicy(train[0])).reward == 1.0
    source = QATaskSource(train_path=str(paths["train"]), eval_path=str(paths["eval"]))
    assert source.tasks("eval") == load_qa_jsonl(paths["eval"])


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"golden_answers": ["x"]}', "missing the field 'question'"),
        ('{"question": "", "golden_answers": ["x"]}', "'question' must be a non-empty string"),
        ('{"question": "q?"}', "missing the field 'golden_answers'"),
        ('{"question": "q?", "golden_answers": []}', "'golden_answers' must be a non-empty list"),
        ('{"question": "q?", "golden_answers": ["x"], "metadata": 3}', "'metadata' must be an object"),
        ('{"question": ', "not valid JSON"),
    ],
)
def test_qa_jsonl_errors_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "ok?", "golden_answers": "x"}\n' + line + "\n")
    with pytest.raises(EnvError, match=f"qa.jsonl:2: .*{message}" if "JSON" not in message else message):
        load_qa_jsonl(path)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"contents": "x"}', "missing the field 'id'"),
        ('{"id": "1"}', "missing the field 'contents'"),
        ('{"id": "1", "contents": 5}', "'contents' must be a string"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_corpus_errors_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": 0, "contents": "fine"}\n' + line + "\n")
    with pytest.raises(EnvError, match=f"corpus.jsonl:2: .*{message}"):
        load_corpus(path)


def test_config_errors_name_the_field(tmp_path):
    retriever = BM25Retriever(CORPUS)
    for kwargs, field in [
        ({"top_k": 0}, "top_k"),
        ({"max_turns": 0}, "max_turns"),
        ({"reward": "bleu"}, "reward"),
        ({"f1_threshold": 0}, "f1_threshold"),
        ({"on_invalid": "retry"}, "on_invalid"),
        ({"tool_timeout_s": -1}, "tool_timeout_s"),
        ({"prompt_template": "Q:"}, "prompt_template"),
    ]:
        with pytest.raises(EnvError, match=field):
            SearchQAEnv(retriever, **kwargs)
    with pytest.raises(EnvError, match="retriever"):
        SearchQAEnv(object())
    with pytest.raises(EnvError, match="corpus_path"):
        make_search_qa_env(corpus_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(EnvError, match="corpus must hold"):
        BM25Retriever([])
    with pytest.raises(EnvError, match="split"):
        QATaskSource().tasks("test")
    with pytest.raises(EpisodeStateError, match="reset"):
        SearchQAEnv(retriever).step("<answer>x</answer>")


FANOUT_SAMPLE = [
    {
        "id": "f1",
        "question": "Which cities host the three oldest fictional leagues?",
        "categories": ["Sports"],
        "answer": {"League A": "Velmora", "League B": "Ostrand"},
        "decomposition": [
            {
                "id": "s1",
                "question": "?",
                "decomposition": [],
                "answer": ["League A", "League B"],
                "depends_on": [],
                "evidence": None,
            }
        ],
    },
    {"id": "f2", "question": "Is Dranthia larger than Velmora?", "categories": [], "answer": True, "decomposition": []},
    {"id": "f3", "question": "Population of Velmora?", "categories": [], "answer": 1200, "decomposition": []},
]


def test_fanoutqa_loader_on_the_documented_format(tmp_path):
    path = tmp_path / "fanout-final-dev.json"
    path.write_text(json.dumps(FANOUT_SAMPLE))
    tasks = load_fanoutqa_dev(path)
    assert [t["id"] for t in tasks] == ["f1", "f2", "f3"]
    assert tasks[0]["golden_answers"] == ["League A - Velmora\nLeague B - Ostrand"]
    assert tasks[0]["metadata"]["answer_strings"] == ["League A", "Velmora", "League B", "Ostrand"]
    assert tasks[0]["metadata"]["num_subquestions"] == 1 and tasks[0]["metadata"]["categories"] == ["Sports"]
    assert tasks[1]["golden_answers"] == ["yes"] and tasks[2]["golden_answers"] == ["1200"]
    env = SearchQAEnv(BM25Retriever(CORPUS), reward="f1", f1_threshold=0.6)
    env.reset(tasks[0])
    assert env.step("<answer>League A - Velmora, League B - Ostrand</answer>").reward == 1.0
    assert answer_to_text(["a", {"k": False}]) == "a\nk - no" and answer_strings([1, ["b"]]) == ["1", "b"]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": "x"}', "expected a JSON list"),
        ('[{"id": "x", "question": "q?"}]', r"\[0\]: FanOutQA question is missing the field 'answer'"),
        ('[{"id": "x", "question": "", "answer": "a"}]', "'question' must be a non-empty string"),
        ("not json", "not valid JSON"),
    ],
)
def test_fanoutqa_loader_errors(tmp_path, content, message):
    path = tmp_path / "dev.json"
    path.write_text(content)
    with pytest.raises(EnvError, match=message):
        load_fanoutqa_dev(path)


def test_fanoutqa_shipped_dev_set():
    """Runs where the optional fanoutqa package is installed (its wheel ships the dev set)."""
    from importlib import metadata

    try:
        metadata.distribution("fanoutqa")
    except metadata.PackageNotFoundError:
        with pytest.raises(EnvError, match="fanoutqa package is not installed"):
            load_fanoutqa_dev()
        return
    tasks = load_fanoutqa_dev()
    assert len(tasks) > 100 and all(t["golden_answers"][0] for t in tasks)


class _BatchingRetriever:
    """BM25 with a search_many that records each call (the Search-R1 HTTP client's shape)."""

    def __init__(self, fail=False):
        self.bm25, self.calls, self.fail = BM25Retriever(CORPUS), [], fail

    def search(self, query, k):
        return self.bm25.search(query, k)

    def search_many(self, queries, k):
        self.calls.append(list(queries))
        if self.fail:
            raise ConnectionError("server down")
        return [self.bm25.search(q, k) for q in queries]


def test_a_rounds_searches_go_to_the_retriever_together():
    from trace_core.envs.base import step_all

    retriever = _BatchingRetriever()
    envs, alone = [SearchQAEnv(retriever) for _ in range(4)], [SearchQAEnv(BM25Retriever(CORPUS)) for _ in range(4)]
    for env in envs + alone:
        env.reset(TASK)
    actions = ["<search> Ossik Tarn </search>", "<answer>Dranthia</answer>", "no tags", "<search> Velmora </search>"]
    steps = step_all(envs, actions)
    assert retriever.calls == [["Ossik Tarn", "Velmora"]]  # one call for the round, answers and invalid turns excluded
    assert [s.observation for s in steps] == [env.step(a).observation for env, a in zip(alone, actions)]
    assert steps[0].info["retrieved_ids"] and steps[1].done
    failing = _BatchingRetriever(fail=True)
    envs = [SearchQAEnv(failing) for _ in range(2)]
    for env in envs:
        env.reset(TASK)
    steps = step_all(envs, ["<search> a </search>", "<search> b </search>"])
    assert all("Search failed: ConnectionError" in s.observation and not s.done for s in steps)
