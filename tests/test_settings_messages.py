"""Unit tests (no I/O beyond a temp config file): settings, message schemas, request checks,
stream assembly."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from services.gateway.assemble import StreamAssembler, from_response
from services.gateway.errors import APIError
from services.gateway.request import read_chat_request
from shared.messages import BadMessage, ScoredV1, TurnV1, decode
from shared.settings import Settings, hash_api_key


def test_prod_profile_refuses_placeholder_secrets_naming_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REEF_PROFILE", raising=False)
    with pytest.raises(ValidationError, match="api_keys"):
        Settings(profile="prod")
    with pytest.raises(ValidationError, match="upstream_api_key"):
        Settings(profile="prod", api_keys={"sk-real-key": "t"}, upstream_api_key="changeme")
    with pytest.raises(ValidationError, match="api_keys"):
        Settings(profile="prod", api_keys={"changeme": "t"})
    assert Settings(profile="dev", upstream_api_key="changeme").profile == "dev"


def test_api_keys_are_held_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REEF_API_KEYS", '{"sk-plain": "acme"}')
    settings = Settings(profile="prod")
    assert settings.api_keys == {hash_api_key("sk-plain"): "acme"}
    assert "sk-plain" not in repr(settings)


def test_env_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "reef.toml"
    config.write_text('profile = "dev"\nlora_rank = 8\nuse_skills = true\nloss_fn = "ppo"\n')
    monkeypatch.setenv("REEF_CONFIG", str(config))
    monkeypatch.setenv("REEF_LORA_RANK", "16")  # env wins over the file
    settings = Settings()
    assert (settings.lora_rank, settings.use_skills, settings.loss_fn) == (16, True, "ppo")
    monkeypatch.setenv("REEF_LOSS_FN", "sgd")
    with pytest.raises(ValidationError, match="loss_fn"):
        Settings()


def _turn(**over: object) -> TurnV1:
    fields: dict[str, object] = dict(
        tenant="t", session_id="s", request_model="m", upstream_model="m",
        messages=[{"role": "user", "content": "hi"}],
        response_message={"role": "assistant", "content": "yo"})
    fields.update(over)
    return TurnV1(**fields)  # type: ignore[arg-type]


def test_messages_round_trip_and_bad_entries_are_named() -> None:
    turn = _turn()
    assert decode({k.encode(): v for k, v in turn.to_fields().items()}) == turn
    scored = ScoredV1(turn=turn, reward=1.0, components={"implicit": 1.0})
    assert decode({k.encode(): v for k, v in scored.to_fields().items()}) == scored
    with pytest.raises(BadMessage, match="lacks"):
        decode({b"x": b"y"})
    with pytest.raises(BadMessage, match="unknown message kind"):
        decode({b"kind": b"turn.v9", b"data": b"{}"})
    with pytest.raises(BadMessage, match=r"invalid turn\.v1"):
        decode({b"kind": b"turn.v1", b"data": b'{"tenant": 1}'})
    with pytest.raises(ValidationError):
        turn.tenant = "other"  # type: ignore[misc]


def test_request_fields_and_sessions() -> None:
    body = {"model": "alias", "messages": [{"role": "user", "content": "x"}],
            "session_id": "body-sid", "session_done": True, "extra_thing": 1}
    chat = read_chat_request(body, {}, "acme", "h", {"alias": "real-model"})
    assert chat.body["model"] == "real-model" and chat.request_model == "alias"
    assert chat.session_id == "body-sid" and chat.session_done
    assert "session_id" not in chat.body and chat.body["extra_thing"] == 1
    chat = read_chat_request({"model": "m", "messages": [{"role": "user"}],
                              "session_id": "b"}, {"x-session-id": "h"}, "acme", "h", {})
    assert chat.session_id == "h" and "session_id" not in chat.body
    with pytest.raises(APIError) as err:
        read_chat_request({"model": "m", "messages": []}, {}, "t", "h", {})
    assert err.value.param == "messages"


def test_stream_assembly_matches_whole_answer() -> None:
    assembler = StreamAssembler()
    chunks = [
        {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "token_ids": [1],
                      "logprobs": {"content": [{"token": "Hel", "logprob": -0.1}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]},
        {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
        {"choices": [], "usage": {"total_tokens": 3}},
    ]
    for chunk in chunks:
        assembler.add(orjson.loads(orjson.dumps(chunk)))
    answer = assembler.finish()
    assert answer.message == {"role": "assistant", "content": "Hel", "reasoning_content": "hm",
                              "tool_calls": [{"id": "a", "type": "function",
                                              "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert (answer.finish_reason, answer.usage, answer.token_ids) == (
        "tool_calls", {"total_tokens": 3}, [1])
    assert answer.sampled() == {"token_ids": [1], "tokens": ["Hel"], "logprobs": [-0.1],
                                "prompt_token_ids": []}
    whole = from_response({"choices": [{"index": 0, "message": answer.message,
                                        "finish_reason": "tool_calls"}]})
    assert whole.message == answer.message and whole.sampled() is None


def test_turns_without_sampling_fields_still_decode_and_new_ones_round_trip() -> None:
    old = orjson.dumps({
        "kind": "turn.v1", "id": "t-old", "tenant": "t", "session_id": "s",
        "request_model": "m", "upstream_model": "m", "messages": [],
        "response_message": {"role": "assistant", "content": "x"},
        "sampled": {"token_ids": [5, 6], "tokens": ["a", "b"], "logprobs": [-0.5, -1.0],
                    "prompt_token_ids": [1]}})
    turn = decode({b"kind": b"turn.v1", b"data": old})
    assert isinstance(turn, TurnV1) and turn.sampled is not None
    assert turn.sampled.logprobs_kind is None  # unknown: recorded before Reef said
    assert (turn.sampled.temperature, turn.sampled.top_p, turn.sampled.top_k,
            turn.sampled.seed, turn.sampled.greedy) == (None, None, None, None, False)
    new = turn.model_copy(update={"sampled": turn.sampled.model_copy(update={
        "logprobs_kind": "processed", "temperature": 0.8, "top_p": 0.95, "top_k": 40,
        "seed": 7})})
    back = decode({k.encode(): v for k, v in new.to_fields().items()})
    assert isinstance(back, TurnV1) and back.sampled == new.sampled
    with pytest.raises(BadMessage):
        bad = orjson.loads(old)
        bad["sampled"]["logprobs_kind"] = "tempered"
        decode({b"kind": b"turn.v1", b"data": orjson.dumps(bad)})
