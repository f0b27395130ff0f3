"""LoRA adapters on the policy server: vLLM's load/unload routes, one adapter per request,
hot swap during a stream.

End to end against a real ``python -m services.policy`` (the fixtures of test_policy, so
the converted model is shared), with real PEFT adapters made here for the converted
SmolLM2 and checked against peft in this process; then the registry in-process on a tiny
random Llama (no server).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import torch

from tests.test_policy import MODEL, PROMPT, PolicyServer, policy_data_dir, server

_FIXTURES = (policy_data_dir, server)
"""test_policy's server fixture, used here too (pytest finds fixtures by module name)."""

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
OTHER_TARGETS = ["q_proj", "up_proj", "down_proj"]
"""Adapter B's layers. B is loaded only in the hot-swap test, so loading it mid-stream
also wraps MLP layers of the served model while a generation runs on A."""
LOGPROB_TOLERANCE = 2e-3


def make_adapter(base: Any, folder: Path, seed: int, sigma: float = 0.1,
                 targets: list[str] = TARGETS) -> Path:
    """Save a PEFT LoRA adapter of ``base`` whose B weights are random (fixed ``seed``), so
    that it changes the answers; ``base`` is left as it was."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * sigma)
    peft_model.save_pretrained(folder)
    peft_model.unload()
    return folder


@dataclass
class Adapters:
    base: Any
    """The converted SmolLM2, in this process, to compute what peft says."""
    a: Path
    b: Path

    def reference(self, adapter: Path | None, prompt: list[int], completion: list[int]
                  ) -> tuple[list[float], list[int]]:
        """peft's logprobs of ``completion`` after ``prompt`` and its greedy choices."""
        from peft import PeftModel

        model = self.base if adapter is None else PeftModel.from_pretrained(self.base, adapter)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
        finally:
            if adapter is not None:
                model.unload()
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(completion)[:, None])[:, 0]
        return chosen.tolist(), logprobs.argmax(-1).tolist()


@pytest.fixture(scope="module")
def adapters(server: PolicyServer, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(server.data_dir / "models" / MODEL,
                                                dtype=torch.float32).eval()
    # Inside the server's data directory: adapters are loaded from nowhere else.
    folder = server.data_dir / "adapters" / f"lora-{time.monotonic_ns()}"
    return Adapters(base, make_adapter(base, folder / "a", 1),
                    make_adapter(base, folder / "b", 2, targets=OTHER_TARGETS))


def load(srv: PolicyServer, name: str, path: Path | str, **extra: Any) -> httpx.Response:
    return httpx.post(srv.url + "/v1/load_lora_adapter", timeout=30,
                      json={"lora_name": name, "lora_path": str(path), **extra})


def unload(srv: PolicyServer, name: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


def greedy(srv: PolicyServer, model: str, max_tokens: int) -> tuple[str, Any]:
    """A greedy answer with the model's own (raw) logprobs, to compare with peft's."""
    raw = srv.client().chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=True,
        extra_body={"return_token_ids": True, "logprobs_mode": "raw_logprobs"})
    return raw.headers["x-reef-policy-version"], raw.parse()


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


def test_adapter_answers_with_its_own_weights(server: PolicyServer, adapters: Adapters) -> None:
    response = load(server, "a-v1", adapters.a)
    assert response.status_code == 200
    assert response.text == "Success: LoRA adapter 'a-v1' added successfully."
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [(MODEL, None), ("a-v1", MODEL)]

    version, answer = greedy(server, "a-v1", 8)
    base_version, base_answer = greedy(server, MODEL, 8)
    assert (version, answer.model) == ("a-v1", "a-v1")
    assert (base_version, base_answer.model) == ("base", MODEL)
    ids = list(answer.choices[0].model_extra["token_ids"])
    prompt = list(answer.model_extra["prompt_token_ids"])
    assert ids != list(base_answer.choices[0].model_extra["token_ids"])

    served = [e.logprob for e in answer.choices[0].logprobs.content]
    expected, argmax = adapters.reference(adapters.a, prompt, ids)
    assert served == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    assert ids == argmax  # greedy under the adapter, as peft computes it
    base_expected, _ = adapters.reference(None, prompt, ids)
    assert served != pytest.approx(base_expected, abs=LOGPROB_TOLERANCE)


def test_load_and_unload_errors_follow_vllm(server: PolicyServer, adapters: Adapters) -> None:
    inside = adapters.a.parent
    assert_openai_error(httpx.post(server.url + "/v1/load_lora_adapter", json={}),
                        400, "lora_invalid")
    assert_openai_error(load(server, "x", inside / "missing"), 400, "lora_not_found")
    assert_openai_error(load(server, "x", inside), 400, "lora_not_found")
    assert_openai_error(load(server, "base", adapters.a), 400, "lora_invalid")
    assert_openai_error(load(server, MODEL, adapters.a), 400, "lora_invalid")
    assert_openai_error(load(server, "has space", adapters.a), 400, "lora_invalid")
    tiny_adapter = _tiny_adapters(inside, 1)[1][0]  # same module names, other shapes
    assert_openai_error(load(server, "x", tiny_adapter), 400, "lora_mismatch")

    assert load(server, "dup", adapters.a).status_code == 200
    duplicate = load(server, "dup", adapters.a)
    assert_openai_error(duplicate, 400, "lora_already_loaded")
    assert "has already been loaded" in duplicate.json()["error"]["message"]
    assert load(server, "dup", adapters.a, load_inplace=True).status_code == 200
    removed = unload(server, "dup")
    assert removed.text == "Success: LoRA adapter 'dup' removed successfully."
    assert_openai_error(unload(server, "dup"), 404, "lora_not_found")


def test_an_unloaded_name_is_a_404_not_the_base_model(server: PolicyServer,
                                                       adapters: Adapters) -> None:
    assert load(server, "gone", adapters.a).status_code == 200
    assert unload(server, "gone").status_code == 200
    ids = [c["id"] for c in httpx.get(server.url + "/v1/models").json()["data"]]
    assert "gone" not in ids
    with pytest.raises(openai.NotFoundError) as err:
        greedy(server, "gone", 1)
    assert err.value.code == "model_not_found"


def test_adapter_paths_are_confined_to_the_data_directory(
        server: PolicyServer, adapters: Adapters, tmp_path: Path) -> None:
    """Outside the data directory (an absolute path, a symlink inside it that leads out)
    or with '..' (even leading back in), a load is refused before anything is read;
    inside it, relative paths work."""
    outside = shutil.copytree(adapters.a, tmp_path / "outside")  # a real adapter
    relative = adapters.a.relative_to(server.data_dir)
    link = adapters.a.parent / f"link-out-{tmp_path.name}"
    link.symlink_to(outside, target_is_directory=True)
    for path in (outside, "/etc", link, f"{adapters.a}/../a", f"{relative}/../a",
                 "../" + server.data_dir.name + f"/{relative}"):
        response = load(server, "confined", path)
        assert_openai_error(response, 400, "lora_path_not_allowed")
        assert response.json()["error"]["param"] == "lora_path"
    assert load(server, "confined", relative).status_code == 200
    assert unload(server, "confined").status_code == 200


def test_hot_swap_during_a_stream(server: PolicyServer, adapters: Adapters) -> None:
    """A stream started on A ends on A while B is loaded and A unloaded under it; the
    event loop keeps answering during the load."""
    assert load(server, "swap-a", adapters.a).status_code == 200
    body = {"model": "swap-a", "messages": PROMPT, "max_tokens": 20, "temperature": 0,
            "stream": True, "logprobs": True, "return_token_ids": True,
            "logprobs_mode": "raw_logprobs"}
    events: list[dict[str, Any]] = []
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", server.url + "/v1/chat/completions", json=body) as stream:
        assert stream.headers["x-reef-policy-version"] == "swap-a"
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        events.append(orjson.loads(next(lines)[6:]))
        health_s = _health_latencies_while(server, lambda: load(server, "swap-b", adapters.b))
        assert unload(server, "swap-a").status_code == 200  # deferred: the stream holds it
        swapped_at = len(events)
        events += [orjson.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert health_s and max(health_s) < 1.0
    assert all("error" not in e for e in events)
    assert len(events) > swapped_at  # tokens kept coming after the swap
    choices = [e["choices"][0] for e in events]
    assert choices[-1]["finish_reason"] in ("length", "stop")
    ids = [i for c in choices for i in c["token_ids"]]
    served = [t["logprob"] for c in choices for t in c["logprobs"]["content"]]
    expected, _ = adapters.reference(adapters.a, events[0]["prompt_token_ids"], ids)
    assert served == pytest.approx(expected, abs=LOGPROB_TOLERANCE)  # all of it on A
    assert greedy(server, "swap-b", 1)[0] == "swap-b"
    with pytest.raises(openai.NotFoundError):  # unloaded: a 404, never the base model
        greedy(server, "swap-a", 1)


def _health_latencies_while(srv: PolicyServer, action: Any) -> list[float]:
    """Run ``action`` on a thread; ``/healthz`` latencies measured meanwhile."""
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(action()))
    latencies: list[float] = []
    with httpx.Client(timeout=10) as http:
        worker.start()
        while worker.is_alive() or not latencies:
            started = time.perf_counter()
            assert http.get(srv.url + "/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
        worker.join()
    assert result and result[0].status_code == 200, result
    return latencies


# --- the registry in-process, on a tiny random Llama -------------------------------------


def _tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _tiny_adapters(folder: Path, count: int) -> tuple[Any, list[Path]]:
    base = _tiny_model()
    return base, [make_adapter(base, folder / f"tiny{i}", seed=i, sigma=0.5)
                  for i in range(count)]


def test_registry_matches_peft_and_evicts_the_least_recently_used_idle(tmp_path: Path) -> None:
    from peft import PeftModel

    from services.policy.lora import ActiveAdapter
    from services.policy.registry import AdapterRegistry, holding

    base, paths = _tiny_adapters(tmp_path, 3)
    served = copy.deepcopy(base)
    active = ActiveAdapter()
    registry = AdapterRegistry(served, active, "tiny", max_loaded=2)
    ids = torch.tensor([[1, 5, 9, 13, 2]])

    async def scenario() -> weakref.ref[torch.Tensor]:
        a = await registry.load("a", str(paths[0]))
        await registry.load("b", str(paths[1]))
        with torch.no_grad():
            plain = base(ids).logits
            assert torch.equal(served(ids).logits, plain)  # no adapter active
            active.current = a
            mine = served(ids).logits
            active.current = None
            reference = PeftModel.from_pretrained(base, paths[0])(ids).logits
        assert torch.allclose(mine, reference, atol=1e-5)
        assert not torch.allclose(mine, plain, atol=1e-3)
        with holding(registry.select("a")):  # a: busy and most recently used
            await registry.load("c", str(paths[2]))
            assert [x.name for x in registry] == ["a", "c"]  # b was the LRU idle one
            registry.unload("a")
            assert a.in_use == 1  # a request still holds it: not freed yet
        return weakref.ref(next(iter(a.deltas.values())).a)

    gone = asyncio.run(scenario())
    gc.collect()
    assert gone() is None  # the last holder let go: the adapter's tensors are freed
    assert [x.name for x in registry] == ["c"]
