"""The policy server, end to end: a real ``python -m services.policy`` on a free port, the
real embedded SmolLM2, the official ``openai`` client.

The GGUF -> safetensors conversion (~20-30 s) happens once per test run, in a
session-wide data dir; set ``REEF_TEST_DATA_DIR`` to keep it between runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import free_port

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
START_TIMEOUT_S = 180.0


@dataclass
class PolicyServer:
    url: str
    data_dir: Path
    log: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=60)


@pytest.fixture(scope="session")
def policy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the converted model is cached: shared by every test of the run.

    A fixed folder of the run's temp dir (not ``mktemp``), so that modules importing
    this fixture (and so holding their own instance of it) share one conversion.
    """
    named = os.environ.get("REEF_TEST_DATA_DIR")
    if named:
        return Path(named)
    folder = tmp_path_factory.getbasetemp() / "policy-data"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(policy_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PolicyServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("policy-log") / "server.log"
    # No Redis here: the server does not follow the weights stream (a replica that did
    # would also register itself in whatever Redis answers at the default address).
    env = {**os.environ, "REEF_PROFILE": "dev", "REEF_DATA_DIR": str(policy_data_dir),
           "REEF_POLICY_HOST": "127.0.0.1", "REEF_POLICY_PORT": str(port),
           "REEF_MODEL_NAME": MODEL, "REEF_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "REEF_POLICY_FOLLOW_WEIGHTS": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.policy"], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
    srv = PolicyServer(f"http://127.0.0.1:{port}", policy_data_dir, log)
    try:
        _wait_ready(srv, proc)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(srv: PolicyServer, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"policy server exited ({proc.returncode}):\n{srv.log.read_text()}")
        try:
            if httpx.get(srv.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"policy server not ready in {START_TIMEOUT_S} s:\n{srv.log.read_text()}")


@pytest.fixture(scope="module")
def tokenizer(server: PolicyServer) -> Any:
    """The tokenizer of the converted model, to check what the server reports."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.data_dir / "models" / MODEL)


def test_models_lists_the_served_model(server: PolicyServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    response = httpx.get(server.url + "/v1/models")
    assert response.headers["x-reef-policy-version"] == "base"
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_answer_carries_aligned_token_ids_and_logprobs(server: PolicyServer,
                                                      tokenizer: Any) -> None:
    raw = server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=PROMPT, max_tokens=12, temperature=0.8, seed=7,
        logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True, "top_k": 50})
    assert raw.headers["x-reef-policy-version"] == "base"
    assert orjson.loads(raw.headers["x-reef-sampling"]) == {
        "logprobs_kind": "processed", "temperature": 0.8, "top_p": 1.0, "top_k": 50,
        "seed": 7, "greedy": False}
    answer = raw.parse()
    assert answer.model == MODEL
    choice = answer.choices[0]
    token_ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content
    assert len(token_ids) == len(content) == answer.usage.completion_tokens > 0
    assert all(entry.logprob <= 0 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.logprob for entry in content)
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == choice.message.content
    assert b"".join(bytes(e.bytes) for e in content if e.token != "<|im_end|>") \
        == choice.message.content.encode()
    prompt_ids = answer.model_extra["prompt_token_ids"]
    assert len(prompt_ids) == answer.usage.prompt_tokens
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_same_seed_same_tokens(server: PolicyServer) -> None:
    def sample() -> list[int]:
        answer = server.client().chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=8, temperature=1.0, seed=123,
            extra_body={"return_token_ids": True})
        return list(answer.choices[0].model_extra["token_ids"])

    assert sample() == sample()


def test_streaming_sends_tokens_as_chunks(server: PolicyServer, tokenizer: Any) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=16, temperature=0.8, seed=3, stream=True,
        logprobs=True, stream_options={"include_usage": True},
        extra_body={"return_token_ids": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 3
    assert all(c.choices[0].index == 0 for c in with_choices)
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["prompt_token_ids"]
    ids = [i for c in with_choices for i in c.choices[0].model_extra["token_ids"]]
    logprobs = [e for c in with_choices for e in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert len(ids) == len(logprobs) == chunks[-1].usage.completion_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == []


def test_stop_string_ends_the_answer(server: PolicyServer) -> None:
    client = server.client()
    full = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=12,
                                          temperature=0).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                stream=True)
            parts = [c.choices[0] for c in chunks if c.choices]
            text = "".join(p.delta.content or "" for p in parts)
            finish = parts[-1].finish_reason
        else:
            choice = client.chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=12, temperature=0,
                stop=stop).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_several_choices_have_their_index(server: PolicyServer) -> None:
    answer = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=3, n=2, seed=1)
    assert [c.index for c in answer.choices] == [0, 1]


def metric(server: PolicyServer, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def test_metrics_count_requests_by_route_and_status(server: PolicyServer) -> None:
    route = "/v1/chat/completions"
    before = metric(server, "reef_policy_requests_total", route=route, status="200")
    bad = metric(server, "reef_policy_requests_total", route=route, status="400")
    server.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
    httpx.post(server.url + route, json={"model": MODEL, "messages": []})
    assert metric(server, "reef_policy_requests_total", route=route, status="200") == before + 1
    assert metric(server, "reef_policy_requests_total", route=route, status="400") == bad + 1
    assert metric(server, "reef_policy_ready") == 1
    assert metric(server, "reef_policy_request_seconds_count", route=route) >= 2


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": PROMPT, "n": 100},
    {"messages": PROMPT, "temperature": 9},
    {"messages": PROMPT, "top_logprobs": 3},
    {"messages": "hello"},
])
def test_bad_request_is_400_in_openai_shape(server: PolicyServer, body: dict[str, Any]) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, n=100, messages=PROMPT)


def test_event_loop_answers_while_generating(server: PolicyServer) -> None:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 5}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            for _ in range(5):  # the generation thread is busy right now
                started = time.perf_counter()
                assert http.get(server.url + "/healthz").status_code == 200
                assert time.perf_counter() - started < 1.0
        # The stream was closed after one chunk: the server must stop sampling the other
        # ~199 tokens (about 20 s here), so a small request gets its turn at once.
        started = time.perf_counter()
        server.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
        assert time.perf_counter() - started < 10.0


# --- unit tests (no server, no model) ----------------------------------------------------


class _CharTokenizer:
    """One token per character (id = code point); id 0 is a special token (EOS)."""

    all_special_ids = [0]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids if i != 0)


def _push_all(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    from services.policy.text import StopTracker

    tracker = StopTracker(_CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(tracker.push(ord(ch)))
        if tracker.stopped:
            return deltas, True
    deltas.append(tracker.flush())
    return deltas, False


def test_stop_string_is_held_back_until_decided() -> None:
    deltas, stopped = _push_all("ab END cd", ("END",))
    assert stopped
    assert "".join(deltas) == "ab "
    assert "E" not in "".join(deltas)


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    deltas, stopped = _push_all("a EN b", ("END",))
    assert not stopped
    assert "".join(deltas) == "a EN b"
    assert deltas[2] == ""  # "E" waited for the next character


def test_incomplete_utf8_is_held_back() -> None:
    from services.policy.text import StopTracker

    class Broken(_CharTokenizer):
        def decode(self, ids: list[int], **_: Any) -> str:
            return "x\ufffd" if len(ids) == 1 else "xé"

    tracker = StopTracker(Broken(), ())
    assert tracker.push(1) == "x"
    assert tracker.push(2) == "é"


def test_greedy_answers_report_logprob_0_and_raw_mode_the_models(server: PolicyServer) -> None:
    """Processed logprobs (the default): a greedy token had probability 1. Asked for raw
    ones (``logprobs_mode``), the same tokens carry the model's own logprobs."""
    client = server.client()

    def greedy(**extra: Any) -> tuple[Any, dict[str, Any]]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=PROMPT, max_tokens=6, temperature=0, logprobs=True,
            extra_body={"return_token_ids": True, **extra})
        return raw.parse(), orjson.loads(raw.headers["x-reef-sampling"])

    processed, stated = greedy()
    assert [e.logprob for e in processed.choices[0].logprobs.content] == [0.0] * 6
    assert stated["logprobs_kind"] == "processed" and stated["greedy"] is True
    raw, stated_raw = greedy(logprobs_mode="raw_logprobs")
    assert stated_raw["logprobs_kind"] == "raw"
    assert raw.choices[0].model_extra["token_ids"] == processed.choices[0].model_extra[
        "token_ids"]
    assert all(e.logprob < 0 for e in raw.choices[0].logprobs.content[:1])


def test_completions_scores_a_sequence_like_the_chat_sampler(server: PolicyServer) -> None:
    """Scoring mode of /v1/completions (the teacher API of on-policy distillation): the
    logprob of each sampled token equals what the sampler reported at temperature 1."""
    policy_url = server.url
    client = server.client()
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
        temperature=1.0, logprobs=True, seed=3, extra_body={"return_token_ids": True})
    extra = resp.model_extra or {}
    prompt_ids = extra["prompt_token_ids"]
    sampled = (resp.choices[0].model_extra or {})["token_ids"]
    sampler_lps = [t.logprob for t in resp.choices[0].logprobs.content]  # type: ignore[union-attr]
    scored = httpx.post(policy_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt_ids + sampled, "echo": True, "logprobs": 1,
        "max_tokens": 0}).json()
    values = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert values[0] is None and len(values) == len(prompt_ids) + len(sampled)
    assert values[-len(sampled):] == pytest.approx(sampler_lps, abs=2e-3)
    bad = httpx.post(policy_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_an_unknown_model_name_is_a_404_never_the_base_model(server: PolicyServer) -> None:
    """Any name but the base model's (or no name) and a loaded adapter's is refused: a
    gateway that asks for an adapter this server does not hold must not get base answers."""
    with pytest.raises(openai.NotFoundError) as err:
        server.client().chat.completions.create(model="reef-v9", messages=PROMPT, max_tokens=1)
    assert err.value.code == "model_not_found"
    response = httpx.post(server.url + "/v1/completions", json={
        "model": "reef-v9", "prompt": [1, 2, 3], "echo": True, "logprobs": 1, "max_tokens": 0})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    answer = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": PROMPT, "max_tokens": 1})  # no model: the base model
    assert answer.status_code == 200 and answer.headers["x-reef-policy-version"] == "base"
