"""A service whose task dies says so and exits non-zero, instead of serving on with a
dead part (before: ``run_workers`` gathered its tasks with ``return_exceptions=True``,
so the trainer's step loop could die while the process kept consuming and acking)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.keys import SCORED, Keys
from shared.messages import Message
from shared.metrics import Health
from shared.settings import Settings
from shared.worker import Consumer, ServiceFailed, run_workers
from tests.conftest import RedisServer, free_port


class Boom(RuntimeError):
    pass


async def test_a_failing_background_task_stops_the_service(
        redis_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    settings = Settings(profile="dev", namespace=namespace, redis_url=redis_server.url,
                        worker_block_ms=100, metrics_port=port)
    health = Health()
    seen: list[int] = []

    async def handler(message: Message, entry_id: str) -> None:
        """Consumes on (it must be stopped too)."""

    async def step_loop(stopping: asyncio.Event) -> None:
        await asyncio.sleep(0.3)
        seen.append(httpx.get(f"http://127.0.0.1:{port}/healthz").status_code)
        raise Boom("a poisonous datum")

    async def observer(stopping: asyncio.Event) -> None:
        await stopping.wait()  # stopped as on SIGTERM once the other task failed
        status = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/healthz")
        seen.append(status.status_code)
        seen.append(json.loads(status.content)["status"] == "failed")

    caplog.set_level(logging.ERROR)
    started = time.monotonic()
    with pytest.raises(ServiceFailed, match="Boom") as raised:
        await run_workers(settings, [Consumer(SCORED, "g", handler)],
                          background=[step_loop, observer], health=health)
    assert time.monotonic() - started < 10
    assert isinstance(raised.value.__cause__, Boom)
    assert seen == [200, 503, True]
    assert health.failure is not None and "Boom" in health.failure
    (record,) = [r for r in caplog.records if r.getMessage() == "worker.task_failed"]
    assert record.exc_info is not None and record.exc_info[0] is Boom


def test_the_trainer_process_exits_non_zero_when_its_step_loop_dies(
        redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    """A model directory that does not load: the trainer's step loop dies at start."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    redis_server.client().xadd(Keys(namespace).stream(SCORED), {"kind": "x", "data": "{}"})
    log_path = tmp_path / "trainer.log"
    env = {"REEF_PROFILE": "dev", "REEF_NAMESPACE": namespace,
           "REEF_REDIS_URL": redis_server.url, "REEF_MODEL_NAME": str(broken),
           "REEF_DATA_DIR": str(tmp_path / "data"), "REEF_METRICS_PORT": str(free_port()),
           "REEF_WORKER_BLOCK_MS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(90)
    finally:
        proc.kill()
    output = log_path.read_text()
    assert code != 0, output[-2000:]
    assert "worker.task_failed" in output and "ServiceFailed" in output


class _Unstartable:
    """A training backend that cannot start (and records that it was closed)."""

    closed = False

    def start(self) -> None:
        raise RuntimeError("the model does not load")

    def close(self) -> None:
        type(self).closed = True


async def test_the_trainer_closes_its_backend_when_it_stops(
        redis_server: RedisServer, namespace: str) -> None:
    """Before: ``close()`` was never called (a Tinker session stayed open)."""
    from services.trainer.__main__ import serve

    settings = Settings(profile="dev", namespace=namespace, redis_url=redis_server.url,
                        worker_block_ms=100)
    with pytest.raises(ServiceFailed, match="model does not load"):
        await serve(settings, lambda s: (_Unstartable(), None))  # type: ignore[arg-type,return-value]
    assert _Unstartable.closed
