"""On-policy distillation: a teacher over real HTTP scores the student's samples; the
student (a tiny real model, local backend) moves toward the teacher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.trainer.backend import Datum
from services.trainer.local import LocalBackend
from services.trainer.metrics import TrainerMetrics
from services.trainer.opd import Teacher, opd_advantages
from services.trainer.samples import Sample
from services.trainer.service import Trainer
from shared.settings import ConfigError, Settings
from tests.conftest import RedisServer, free_port
from tests.test_trainer_service import settings_for, tiny_model  # noqa: F401

FAVOURITE = 30
"""The teacher is sure of this token, and doubts every other."""
PROBE_TOKENS = ["Re", "ef", " checks"]


class FakeTeacher:
    """A teacher LLM's scoring endpoint (``/v1/completions``, echo + logprobs)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[Any] = []
        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.01)

    async def completions(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.calls.append(body["prompt"])
        prompt = body["prompt"]
        if isinstance(prompt, str):
            tokens, values = PROBE_TOKENS, [None, -1.0, -1.0]
        else:
            tokens = [str(t) for t in prompt]
            values = [None] + [-0.05 if t == FAVOURITE else -4.0 for t in prompt[1:]]
        return Response(orjson.dumps({"choices": [{"index": 0, "text": "", "logprobs": {
            "tokens": tokens, "token_logprobs": values}}]}), media_type="application/json")


@pytest.fixture(scope="module")
def teacher_server() -> Iterator[FakeTeacher]:
    server = FakeTeacher()
    yield server
    server.server.should_exit = True


def test_advantages_are_teacher_minus_student() -> None:
    assert opd_advantages([-1.0, -2.0], [-0.5, -3.0], 2.0) == [1.0, -2.0]


async def test_distillation_moves_the_student_toward_the_teacher(
        redis_server: RedisServer, namespace: str, tiny_model: Path, tmp_path: Path,  # noqa: F811
        teacher_server: FakeTeacher) -> None:
    settings = settings_for(namespace, redis_server.url, tiny_model, tmp_path, mode="opd",
                            teacher_base_url=f"http://127.0.0.1:{teacher_server.port}/v1",
                            teacher_model="teacher", kl_penalty_coef=1.0, learning_rate=1e-2)
    client = aioredis.from_url(redis_server.url)
    teacher = Teacher(settings)
    backend = LocalBackend(settings, tiny_model, tmp_path / "opd")
    trainer = Trainer(settings, client, backend, TrainerMetrics.create(), teacher, PROBE_TOKENS)
    await asyncio.to_thread(backend.start)
    await teacher.check_tokenizer(PROBE_TOKENS)
    with pytest.raises(ConfigError, match="tokenize differently"):
        await teacher.check_tokenizer(["something", "else"])

    # The student sampled the teacher's favourite token sometimes, other tokens otherwise.
    batch = [Sample(turn_id=f"t{i}", prompt=[1, 5, 9, 11],
                    completion=[FAVOURITE if i % 2 else 40 + i, 2], logprobs=[-3.0, -3.0],
                    reward=0.0, version=0, group="g") for i in range(4)]
    probe = Datum.from_sample([1, 5, 9, 11], [FAVOURITE, 2], [-3.0, -3.0], 0.0)
    before = (await asyncio.to_thread(backend.logprobs, [probe]))[0]
    for _ in range(4):
        await trainer.step([s for s in batch])
    after = (await asyncio.to_thread(backend.logprobs, [probe]))[0]
    assert after[-2] - before[-2] > 0.1  # the favourite token after this prompt gained
    assert trainer.metrics.kl._value.get() != 0.0  # type: ignore[attr-defined]
    assert len(teacher_server.calls) >= 4
    await teacher.close()
    await client.aclose()



def test_opd_without_a_teacher_is_refused() -> None:
    with pytest.raises(ConfigError, match="teacher_base_url"):
        Teacher(Settings(profile="dev", mode="opd"))
