"""The LLM-as-judge scorer (kind ``judge``) without a model: rubric rendering, the parsing of
scores and verdicts from hand-written judge answers (an unparsable or out-of-range one is an
error carrying the raw text, never a 0), normalisation by hand, config errors naming their
field, and the OpenAI-compatible path against a real HTTP server on loopback (the standard
library's http.server answering /v1/completions in OpenAI's shape). The vLLM judge is
tests/integration/test_judge_vllm.py."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from services.core.config import RewardConfig, ScorerConfig
from services.core.config_loading import dump_config, load_config
from services.core.errors import UserError
from services.core.judge_settings import DEFAULT_PATTERNS, DEFAULT_TEMPLATES, template_problem
from services.reward.ensemble import RewardEnsemble, ScorerActor
from services.reward.judge import JudgeAnswerError, JudgeScorer, parse_grade, parse_verdict, render
from services.reward.scorers import ScorerError, ScorerOutputError, build_scorer, resolve_scorer_config, scorer_env

GRADE = DEFAULT_PATTERNS["grade"]


class Canned:
    """A judge backend that answers from a list, to test parsing (the backends are tested
    below with real servers and in tests/integration with a real engine)."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def complete(self, texts):
        self.seen.extend(texts)
        return self.answers[: len(texts)]


def judge(answers, **kwargs) -> JudgeScorer:
    template = kwargs.pop("template", DEFAULT_TEMPLATES[kwargs.get("mode", "grade")])
    return JudgeScorer("critic", Canned(answers), template, **kwargs)


# --- rubric ------------------------------------------------------------------------------------


def test_render_fills_placeholders_once_and_leaves_other_braces():
    template = 'Q: {prompt}\nA: {completion}\nRef: {reference}\nJSON: {"score": N} {} {0}'
    assert render(template, "2+2=", "4", "4") == 'Q: 2+2=\nA: 4\nRef: 4\nJSON: {"score": N} {} {0}'
    # a completion that contains a placeholder stays as written (one pass)
    assert render("{completion}|{reference}", "p", "{reference}", "R") == "{reference}|R"
    with pytest.raises(ValueError, match=r"\{reference\} has no value"):
        render("{completion} {reference}", "p", "c")


def test_default_rubrics_and_patterns():
    assert template_problem(DEFAULT_TEMPLATES["grade"], "grade") is None
    assert template_problem(DEFAULT_TEMPLATES["compare"], "compare") is None
    assert "{reference}" not in DEFAULT_TEMPLATES["grade"]
    rubric = render(DEFAULT_TEMPLATES["compare"], "list 2 colors:", " red blue", " red green")
    assert "Request:\nlist 2 colors:\n\nAnswer A:\n red blue\n\nAnswer B:\n red green\n\n" in rubric
    assert '"Winner: A", "Winner: B" or "Winner: tie"' in rubric
    assert re.search(GRADE, "Score: 7").group(1) == "7"
    assert re.search(DEFAULT_PATTERNS["compare"], "winner: **b**").group(1) == "b"


# --- parsing and normalisation, by hand ---------------------------------------------------------


@pytest.mark.parametrize("raw, lo, hi, expected", [
    ("Score: 7", 1, 10, 6 / 9),
    ("score: 1", 1, 10, 0.0),
    ("SCORE = 10\n", 1, 10, 1.0),
    ("Score: 2.5", 0, 5, 0.5),
    ("Score: 3. On reflection, Score: 8", 1, 10, 7 / 9),  # the last match counts
    ("Score: -1", -1, 1, 0.0),
])
def test_parse_grade_by_hand(raw, lo, hi, expected):
    assert parse_grade(raw, GRADE, lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize("raw, why", [
    ("I'd say 7/10", "does not match score_pattern"),
    ("Score: seven", "does not match score_pattern"),
    ("Score: 11", "scores 11, outside score_range [1, 10]"),
    ("Score: 0", "scores 0, outside score_range [1, 10]"),
    ("", "does not match score_pattern"),
])
def test_parse_grade_refuses(raw, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_grade(raw, GRADE, 1, 10)


def test_parse_verdicts():
    pattern = DEFAULT_PATTERNS["compare"]
    assert [parse_verdict(r, pattern) for r in ("Winner: A", "winner: b", "Winner: TIE", "Winner:B.")] == [
        1.0, 0.0, 0.5, 0.0]
    for raw, why in (("Winner: C", "does not match"), ("A is better", "does not match")):
        with pytest.raises(ValueError, match=why):
            parse_verdict(raw, pattern)
    with pytest.raises(ValueError, match=r"captured 'draw', not a verdict \(A, B or tie\)"):
        parse_verdict("verdict: draw", r"verdict: (\w+)")


def test_scorer_scores_and_normalises():
    scorer = judge(["Score: 1", "Score: 10", "Score: 4"], score_range=(1, 10))
    assert scorer.score(["p", "q", "r"], ["a", "b", "c"]) == pytest.approx([0.0, 1.0, 1 / 3])
    assert scorer.backend.seen[1] == render(DEFAULT_TEMPLATES["grade"], "q", "b")
    custom = judge([" 3", "0 then 4"], pattern=r"(\d)", score_range=(0, 4))
    assert custom.score(["p", "q"], ["a", "b"]) == [0.75, 1.0]


def test_unparsable_and_out_of_range_answers_are_errors_with_the_raw_text():
    scorer = judge(["Score: 5", "It is fine.\nNo score.", "Score: 42"])
    with pytest.raises(JudgeAnswerError) as info:
        scorer.score(["p"] * 3, ["a", "b", "c"])
    message = str(info.value)
    assert message.startswith("reward scorer 'critic': the judge's answer to sample 1 does not match score_pattern")
    assert message.endswith("(2 of 3 answers gave no score); the judge's raw text: 'It is fine.\\nNo score.'")
    assert (info.value.index, info.value.raw) == (1, "It is fine.\nNo score.")
    assert isinstance(info.value, ScorerOutputError)  # a bad output, not retried, never a 0
    with pytest.raises(JudgeAnswerError, match=r"sample 0 scores 42, outside score_range \[1, 10\]; "
                                               r".*raw text: 'Score: 42'"):
        judge(["Score: 42"]).score(["p"], ["a"])
    long = "x" * 1000
    with pytest.raises(JudgeAnswerError, match=r"raw text: 'x{400}\.\.\.'$"):
        judge([long]).score(["p"], ["a"])


def test_compare_mode_reads_the_reference_column():
    scorer = judge(["Winner: A", "Winner: B", "winner: tie"], mode="compare", answer_key="gold")
    assert scorer.score(["p", "q", "r"], ["a", "b", "c"], {"gold": ["x", 7.0, "z"]}) == [1.0, 0.0, 0.5]
    assert "Answer A:\nb\n\nAnswer B:\n7\n\n" in scorer.backend.seen[1]  # 7.0 through JSON shows as 7
    with pytest.raises(ScorerError, match=r"'critic': the rubric shows \{reference\} but the prompts have no column "
                                          r"'gold' \(answer_key\); columns: answer"):
        judge(["Winner: A"], mode="compare", answer_key="gold").score(["p"], ["a"], {"answer": ["x"]})
    with pytest.raises(ScorerError, match=r"sample 1 has no reference answer \(column 'gold' is null\)"):
        judge(["Winner: A"] * 2, mode="compare", answer_key="gold").score(["p"] * 2, ["a"] * 2, {"gold": ["x", None]})
    with pytest.raises(JudgeAnswerError, match=r"sample 0 captured 'draw', not a verdict"):
        judge(["verdict: draw"], mode="compare", pattern=r"verdict: (\w+)").score(["p"], ["a"], {"answer": ["x"]})


# --- config ------------------------------------------------------------------------------------


def field_error(**settings) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        ScorerConfig(kind="judge", **settings)
    cause = info.value.errors()[0]["ctx"]["error"]
    return cause.key, str(cause)


URL = "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("settings, key, message", [
    ({}, "path", "kind 'judge' needs path (a local judge model directory, served by vLLM) or address"),
    ({"path": "judge", "address": URL}, "address", "not both"),
    ({"address": "127.0.0.1:8000"}, "address", "needs address as an http(s) base URL"),
    ({"address": "http://127.0.0.1:99999/v1", "judge_model": "j"}, "address", "bad port"),
    ({"address": URL}, "judge_model", "with address needs judge_model"),
    ({"path": "judge", "judge_model": "j"}, "judge_model", "judge_model is a setting of a judge at address"),
    ({"path": "judge", "timeout_s": 5}, "timeout_s", "a setting of a judge at address; this judge uses path"),
    ({"address": URL, "judge_model": "j", "max_length": 64}, "max_length", "a setting of a judge at path"),
    ({"path": "judge", "template": "Rate {prompt}: {answer}"}, "template",
     "template has an unknown placeholder {answer}; a rubric may use {prompt}, {completion}, {reference}"),
    ({"path": "judge", "template": "Rate {prompt}"}, "template", "template has no {completion} placeholder"),
    ({"path": "judge", "judge_mode": "compare", "template": "{prompt} {completion}"}, "template",
     "has no {reference} placeholder, which judge_mode compare needs"),
    ({"path": "judge", "score_pattern": "Score: [0-9"}, "score_pattern", "score_pattern is not a valid regular expr"),
    ({"path": "judge", "score_pattern": r"Score: \d+"}, "score_pattern", "score_pattern has no group"),
    ({"path": "judge", "score_range": (10, 1)}, "score_range", "score_range needs [lo, hi] with lo < hi"),
    ({"path": "judge", "judge_mode": "compare", "score_range": (0, 1)}, "score_range", "is for judge_mode grade"),
    ({"path": "judge", "judge_mode": "compare", "answer_key": None}, "answer_key", "needs answer_key"),
    ({"path": "judge", "template": "{completion} vs {reference}", "answer_key": None}, "answer_key",
     "needs answer_key"),
])
def test_config_errors_name_their_field(settings, key, message):
    got_key, got = field_error(**settings)
    assert got_key == key and message in got


def test_config_errors_in_a_file_name_field_and_line(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("reward:\n  scorers:\n    - kind: toy_gold\n    - kind: judge\n      path: judge\n"
                    "      score_pattern: 'Score: \\d+'\n")
    with pytest.raises(UserError) as info:
        load_config(str(path))
    assert f"{path}:6: reward.scorers.1.score_pattern: score_pattern has no group" in str(info.value)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.noise_std: 'judge' does not use noise_std"):
        load_config(str(path), ["reward.scorers.0.kind=judge", "reward.scorers.0.path=j",
                                "reward.scorers.0.noise_std=1"])


def test_a_valid_judge_config_round_trips(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text(f"reward:\n  aggregate: wco\n  scorers:\n    - kind: toy_gold\n    - kind: judge\n"
                    f"      address: {URL}\n      judge_model: tiny\n      score_range: [0, 5]\n")
    cfg = load_config(str(path))
    member = cfg.reward.scorers[1]
    assert (member.score_range, member.judge_mode, member.template) == ((0, 5), "grade", None)
    assert member.judge_max_tokens == 16
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)).reward.scorers[1] == member


def test_rubric_file_is_read_when_resolved(tmp_path, monkeypatch):
    (tmp_path / "rubric.txt").write_text("Judge {completion} against {reference}. Score: N\n")
    monkeypatch.chdir(tmp_path)
    cfg = ScorerConfig(kind="judge", address=URL, judge_model="j", template="rubric.txt", answer_key="gold")
    resolved = resolve_scorer_config(cfg, 2)
    assert resolved.template == "Judge {completion} against {reference}. Score: N\n"  # shipped to the actor inline
    assert JudgeScorer.columns_needed(cfg) == ["gold"]  # the file shows {reference}
    assert JudgeScorer.columns_needed(cfg.model_copy(update={"template": None})) == []
    with pytest.raises(UserError, match=r"reward\.scorers\.2\.template: no rubric file 'missing\.txt'"):
        resolve_scorer_config(cfg.model_copy(update={"template": "missing.txt"}), 2)
    (tmp_path / "bad.txt").write_text("Judge {prompt}.")
    with pytest.raises(UserError, match=r"reward\.scorers\.2\.template: the rubric file 'bad\.txt' has no "
                                        r"\{completion\}"):
        resolve_scorer_config(cfg.model_copy(update={"template": "bad.txt"}), 2)
    with pytest.raises(UserError, match=r"reward\.scorers\.2\.answer_key: the rubric shows \{reference\}"):
        resolve_scorer_config(cfg.model_copy(update={"answer_key": None}), 2)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: no judge model directory at 'nowhere'"):
        resolve_scorer_config(ScorerConfig(kind="judge", path="nowhere"), 0)


def test_actor_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert scorer_env(ScorerConfig(kind="judge", path=str(tmp_path)), 0) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    monkeypatch.setenv("FLYWHEEL_TEST_JUDGE_KEY", "k3y")
    endpoint = ScorerConfig(kind="judge", address=URL, judge_model="j", token_env="FLYWHEEL_TEST_JUDGE_KEY")
    assert scorer_env(endpoint, 0) == {"FLYWHEEL_TEST_JUDGE_KEY": "k3y"}
    monkeypatch.delenv("FLYWHEEL_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match=r"reward\.scorers\.1\.token_env: the environment variable "
                                        r"FLYWHEEL_TEST_JUDGE_KEY"):
        build_scorer(endpoint, 1)


# --- an OpenAI-compatible endpoint on loopback --------------------------------------------------


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/completions in OpenAI's reply shape, choices in reverse order (the index is
    what orders them). The answer to a rubric is the text after its last '=>'. The server's
    ``failures`` list, when not empty, answers a request with its first status instead."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if server.failures:
            status, text = server.failures.pop(0)
            return self.reply(status, text.encode())
        if self.path != "/v1/completions":
            return self.reply(404, b'{"error": "no such route"}')
        if server.broken is not None:
            return self.reply(200, server.broken.encode())
        choices = [{"text": p.rsplit("=>", 1)[-1], "index": i, "logprobs": None, "finish_reason": "stop"}
                   for i, p in enumerate(body["prompt"])]
        reply = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                 "choices": choices[::-1], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        self.reply(200, json.dumps(reply).encode())

    def reply(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.requests, server.failures, server.broken = [], [], None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def endpoint_cfg(server, **settings) -> ScorerConfig:
    base = {"kind": "judge", "address": f"http://127.0.0.1:{server.server_address[1]}/v1", "judge_model": "tiny-judge",
            "template": "{prompt} {completion}=>Score: {completion}", "score_range": (0, 10)}
    return ScorerConfig(**{**base, **settings})


def test_endpoint_grades_in_batches(endpoint):
    scorer = build_scorer(endpoint_cfg(endpoint, batch_size=2, judge_max_tokens=5, seed=3), 0)
    completions = ["0", "10", "5", "2.5", "7"]
    assert scorer.judge_texts(["p"] * 5, completions) == [f"Score: {c}" for c in completions]
    assert scorer.score(["p"] * 5, completions) == pytest.approx([0.0, 1.0, 0.5, 0.25, 0.7])
    requests = endpoint.requests[3:]  # after the judge_texts call: 3 requests again, 2 + 2 + 1 prompts
    assert [r["path"] for r in requests] == ["/v1/completions"] * 3
    assert [len(r["body"]["prompt"]) for r in requests] == [2, 2, 1]
    assert requests[0]["body"] == {"model": "tiny-judge", "prompt": ["p 0=>Score: 0", "p 10=>Score: 10"],
                                   "max_tokens": 5, "temperature": 0.0, "seed": 3, "n": 1}
    assert requests[0]["auth"] is None


def test_endpoint_compare_mode_and_token(endpoint, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_JUDGE_KEY", "k3y")
    cfg = endpoint_cfg(endpoint, judge_mode="compare", template="{completion} or {reference}? =>Winner: {completion}",
                       token_env="FLYWHEEL_TEST_JUDGE_KEY", score_range=(1.0, 10.0))
    scores = build_scorer(cfg, 0).score(["p"] * 3, ["A", "B", "tie"], {"answer": ["x", "y", "z"]})
    assert scores == [1.0, 0.0, 0.5]
    assert endpoint.requests[0]["body"]["prompt"][1] == "B or y? =>Winner: B"
    assert endpoint.requests[0]["auth"] == "Bearer k3y"


def test_endpoint_answer_that_does_not_parse(endpoint):
    scorer = build_scorer(endpoint_cfg(endpoint, name="judge-http"), 1)
    with pytest.raises(JudgeAnswerError, match=r"'judge-http': the judge's answer to sample 1 does not match "
                                               r"score_pattern .*raw text: 'Score: ten'"):
        scorer.score(["p", "p"], ["3", "ten"])
    with pytest.raises(JudgeAnswerError, match=r"sample 0 scores 11, outside score_range \[0, 10\]"):
        scorer.score(["p"], ["11"])


def test_endpoint_in_an_ensemble_with_wco(endpoint):
    """A judge is a member like any other: the worst case over it and gold, by hand."""
    judge_cfg = endpoint_cfg(endpoint, name="judge", template="{prompt}{completion}=>Score: {reference}")
    cfg = RewardConfig(aggregate="wco", scorers=[
        ScorerConfig(kind="python", path="services.core.toy_world:gold_reward", name="gold"), judge_cfg])
    prompts, completions = ["list 2 colors:", "12+7=", "3-1="], [" red blue", "19", "5"]
    result = RewardEnsemble(cfg).score(prompts, completions, {"answer": ["2", "10", "8"]})
    assert result.member_names == ["gold", "judge"]
    assert result.member_scores == [[1.0, 1.0, 0.0], pytest.approx([0.2, 1.0, 0.8])]
    assert result.scores == pytest.approx([0.2, 1.0, 0.0])


def test_endpoint_errors_name_the_address(endpoint):
    with socket.socket() as free:  # a port nobody listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dead = endpoint_cfg(endpoint, address=f"http://127.0.0.1:{port}/v1", retries=1, timeout_s=2)
    with pytest.raises(ScorerError, match=rf"'judge-0': the judge endpoint http://127\.0\.0\.1:{port}/v1/completions "
                                          r"is unreachable after 2 attempt\(s\) \(2 s each\): .*refused"):
        build_scorer(dead, 0).score(["p"], ["1"])
    with pytest.raises(ScorerError) as info:  # a member's actor passes the error on as it is, not re-wrapped
        ScorerActor(dead, 0).score(["p"], ["1"])
    assert str(info.value).startswith(f"reward scorer 'judge-0': the judge endpoint http://127.0.0.1:{port}/v1/")
    scorer = build_scorer(endpoint_cfg(endpoint, retries=2), 0)
    endpoint.failures = [(503, "busy"), (429, "slow down")]  # retried: the third attempt answers
    assert scorer.score(["p"], ["4"]) == [0.4] and len(endpoint.requests) == 3
    endpoint.failures = [(400, '{"error": "model tiny-judge does not exist"}')]  # final at once
    with pytest.raises(ScorerError, match=r"/v1/completions answered HTTP 400 Bad Request: .*does not exist"):
        scorer.score(["p"], ["4"])
    assert len(endpoint.requests) == 4
    wrong_route = build_scorer(endpoint_cfg(endpoint, address=f"http://127.0.0.1:{endpoint.server_address[1]}"), 0)
    with pytest.raises(ScorerError, match=r"answered HTTP 404"):
        wrong_route.score(["p"], ["4"])


@pytest.mark.parametrize("body, why", [
    ("<html>oops</html>", "a body that is not JSON"),
    ('{"choices": []}', "0 choices for 2 prompts"),
    ('{"object": "error"}', "no choices for 2 prompts"),
    ('{"choices": [{"text": "Score: 1", "index": 0}, {"text": "Score: 2", "index": 0}]}',
     "a malformed choice at position 1"),
    ('{"choices": [{"text": "Score: 1", "index": 0}, {"text": null, "index": 1}]}',
     "a malformed choice at position 1"),
])
def test_endpoint_reply_not_in_openai_shape(endpoint, body, why):
    endpoint.broken = body
    with pytest.raises(ScorerError, match=re.escape(why) + r"; not an OpenAI completions reply: "):
        build_scorer(endpoint_cfg(endpoint), 0).score(["p", "q"], ["1", "2"])


def test_answer_error_survives_pickling():
    """Ray pickles a member's error to send it to the caller."""
    import pickle

    error = pickle.loads(pickle.dumps(JudgeAnswerError("reward scorer 'j': bad", 3, "Score: ?")))
    assert (str(error), error.index, error.raw) == ("reward scorer 'j': bad", 3, "Score: ?")
