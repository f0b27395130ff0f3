"""Reef's rq jobs: export, replay and re-mine through a real rq worker (``JobWorker``, a
``SimpleWorker``, run in burst mode in the test process) on a private Redis; the miner's
LLM is the scripted fake over real HTTP; the CLI in-process; the worker as a process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from rq import Retry
from rq.job import JobStatus
from rq.registry import FailedJobRegistry

from services.jobs import tasks
from services.jobs.dataset import HF_DATA_FILE
from services.jobs.queue import SERIALIZER, enqueue, fetch_job, job_queue, queue_name
from services.jobs.worker import JobMetrics, JobWorker
from services.skill_miner.metrics import MinerMetrics
from services.skill_miner.service import SkillMiner
from services.stack import jobs_cli
from shared.keys import SCORED, Keys
from shared.messages import ScoredV1, TokenLogprobs, TurnV1, decode
from shared.redis_client import connect
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.fake_llm import FakeLLM
from tests.service_proc import ServiceProcess

TENANT = "acme"
FILE_SKILL: dict[str, Any] = {
    "name": "verify-file-paths", "category": "coding",
    "description": "Before answering questions about files, check that the paths exist.",
    "body": "When the user names a file, confirm it exists before suggesting edits."}


# --- helpers ----------------------------------------------------------------------------

def scored(session: str, index: int, reward: float | None, *, tenant: str = TENANT,
           user: str = "How do I do it?", answer: str = "Like this.", follow_up: str = "",
           sampled: bool = False, params: dict[str, Any] | None = None) -> ScoredV1:
    """A scored main turn as the scorer publishes it (with token ids if ``sampled``)."""
    turn = TurnV1(
        id=f"{tenant}-{session}-{index}", tenant=tenant, session_id=session, turn_index=index,
        request_model="m", upstream_model="m", policy_version="reef-v2",
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": [{"type": "text", "text": user}]}],
        request_params=params or {"temperature": 0.2},
        response_message={"role": "assistant", "content": answer},
        sampled=TokenLogprobs(token_ids=[20 + index, 21, 2], logprobs=[-1.5, -0.25, -0.125],
                              prompt_token_ids=[1, 5, 9]) if sampled else None,
        skill_ids=["sk_0123456789abcdef"] if index == 0 else [])
    return ScoredV1(id=turn.id, turn=turn, reward=reward, trainable=reward is not None,
                    follow_up=[{"role": "user", "content": follow_up}] if follow_up else [],
                    components={} if reward is None else {"implicit": reward,
                                                          "implicit.correction": 1.0})


def publish(client: redis.Redis, namespace: str, *messages: ScoredV1) -> None:
    for message in messages:
        client.xadd(Keys(namespace).stream(SCORED), message.to_fields())  # type: ignore[arg-type]


def stream_messages(client: redis.Redis, namespace: str) -> list[ScoredV1]:
    out = []
    for _, fields in client.xrange(Keys(namespace).stream(SCORED)):
        message = decode(fields)
        assert isinstance(message, ScoredV1)
        out.append(message)
    return out


def run_worker(settings: Settings, client: redis.Redis) -> JobMetrics:
    """Work the namespace's queue until it is empty; returns the worker's metrics."""
    metrics = JobMetrics.create()
    JobWorker([job_queue(settings, client)], connection=client, serializer=SERIALIZER,
              metrics=metrics).work(burst=True)
    return metrics


def runs(metrics: JobMetrics, job: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value("reef_jobs_runs_total",
                                              {"job": job, "outcome": outcome})
    return value or 0.0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# --- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm_server() -> Iterator[FakeLLM]:
    server = FakeLLM(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake(llm_server: FakeLLM) -> FakeLLM:
    llm_server.reset()
    return llm_server


@pytest.fixture
def env(redis_server: RedisServer, namespace: str, fake: FakeLLM,
        monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment the job functions build their settings from (they run here)."""
    values = {
        "REEF_PROFILE": "dev", "REEF_REDIS_URL": redis_server.url, "REEF_NAMESPACE": namespace,
        "REEF_MINER_BASE_URL": fake.base_url, "REEF_MINER_MODEL": "miner-model",
        "REEF_MINER_TIMEOUT_SECONDS": "5", "REEF_MINER_RETRIES": "0",
        "REEF_AZURE_OPENAI_ENDPOINT": "", "REEF_AZURE_OPENAI_DEPLOYMENT": "",
        "REEF_MAX_NEW_SKILLS": "4", "REEF_RETRIEVAL_MODE": "bm25", "HF_HUB_OFFLINE": "1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    yield c
    c.close()


@pytest.fixture
def recorded(client: redis.Redis, namespace: str) -> list[ScoredV1]:
    """Two sessions of the tenant (one sampled), another tenant's turn, and entries that
    are not scored turns, in the ``scored`` stream; returns the tenant's turns."""
    ours = [scored("s1", 0, 1.0, sampled=True), scored("s1", 1, -1.0, follow_up="No."),
            scored("s2", 0, None), scored("s2", 1, 0.5, sampled=True)]
    publish(client, namespace, ours[0], ours[1], scored("s9", 0, 1.0, tenant="other"),
            ours[2], ours[3])
    stream = Keys(namespace).stream(SCORED)
    client.xadd(stream, {"kind": "bogus.v1", "data": "{}"})
    client.xadd(stream, {"kind": "scored.v1", "data": "not json"})
    return ours


# --- export -----------------------------------------------------------------------------

def test_export_through_rq_writes_jsonl_and_a_loadable_hf_dataset(
        settings: Settings, client: redis.Redis, namespace: str, recorded: list[ScoredV1],
        tmp_path: Path) -> None:
    out = tmp_path / "export"
    job = enqueue(settings, tasks.export_dataset, namespace, TENANT, str(out),
                  connection=client)
    assert job.origin == queue_name(namespace)
    metrics = run_worker(settings, client)

    job = fetch_job(job.id, client)
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert result["exported"] == 4 and result["skipped"] == 1 and result["invalid"] == 2
    assert runs(metrics, "export_dataset", "succeeded") == 1

    rows = read_jsonl(out / "scored.jsonl")
    assert [r["turn_id"] for r in rows] == [m.turn.id for m in recorded]
    assert {r["tenant"] for r in rows} == {TENANT}
    first, second = rows[0], rows[1]
    assert (first["session_id"], first["turn_index"], first["turn_type"]) == ("s1", 0, "main")
    assert first["policy_version"] == "reef-v2"
    assert first["messages"] == recorded[0].turn.messages
    assert first["answer"] == {"role": "assistant", "content": "Like this."}
    assert first["reward"] == 1.0 and first["trainable"] is True
    assert first["components"] == {"implicit": 1.0, "implicit.correction": 1.0}
    assert first["skill_ids"] == ["sk_0123456789abcdef"]
    assert first["token_ids"] == [20, 21, 2] and first["prompt_token_ids"] == [1, 5, 9]
    assert first["logprobs"] == [-1.5, -0.25, -0.125]
    assert second["follow_up"] == [{"role": "user", "content": "No."}]
    assert second["token_ids"] == [] and rows[2]["reward"] is None
    # The whole message, losslessly.
    assert [ScoredV1.model_validate(r["message"]) for r in rows] == recorded

    import datasets

    loaded = datasets.load_dataset(str(out / "hf"), cache_dir=str(tmp_path / "hf-cache"))
    train = loaded["train"]
    assert train.num_rows == 4
    assert train[0]["token_ids"] == [20, 21, 2] and train[0]["turn_id"] == recorded[0].turn.id
    assert train[0]["messages"][1] == {"role": "user", "content": "How do I do it?"}
    assert train[0]["answer"] == "Like this."
    assert train[1]["components"] == [{"name": "implicit", "value": -1.0},
                                      {"name": "implicit.correction", "value": 1.0}]
    assert train[2]["reward"] is None
    assert ScoredV1.model_validate_json(train[3]["message"]) == recorded[3]
    card = (out / "hf" / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and HF_DATA_FILE in card
    assert sorted(p.name for p in out.iterdir()) == ["hf", "scored.jsonl"]  # no temp files


def test_export_never_writes_credentials_a_client_put_in_the_body(
        env: dict[str, str], client: redis.Redis, namespace: str, tmp_path: Path) -> None:
    secret = "sk-live-9f8e7d6c5b4a39281706f5e4"
    publish(client, namespace, scored("s1", 0, 1.0, params={"temperature": 0.1,
                                                            "api_key": secret}))
    result = tasks.export_dataset(namespace, TENANT, str(tmp_path))
    assert result["exported"] == 1 and result["credential_fields_dropped"] == 1
    for path in (tmp_path / "scored.jsonl", tmp_path / "hf" / HF_DATA_FILE):
        text = path.read_text()
        assert secret not in text and "temperature" in text and "api_key" not in text


def test_export_and_replay_take_each_turn_once_at_its_newest_revision(
        env: dict[str, str], client: redis.Redis, namespace: str, tmp_path: Path) -> None:
    first, other = scored("s1", 0, 1.0), scored("s1", 1, 0.5)
    revised = [first.model_copy(update={"id": f"{first.turn.id}:r{n}", "reward": reward,
                                        "revision": n, "previous_reward": previous})
               for n, reward, previous in ((1, -1.0, 1.0), (2, -0.5, -1.0))]
    publish(client, namespace, first, other, revised[0], revised[1])
    result = tasks.export_dataset(namespace, TENANT, str(tmp_path))
    assert (result["exported"], result["superseded"]) == (2, 2)  # a revision is no new turn
    rows = read_jsonl(tmp_path / "scored.jsonl")
    assert [(r["turn_id"], r["reward"]) for r in rows] == [(other.turn.id, 0.5),
                                                           (first.turn.id, -0.5)]
    # A replay appends each revision once (its marker is the message id).
    fresh = namespace + "-fresh"
    assert tasks.replay_dataset(str(tmp_path / "scored.jsonl"), fresh)["appended"] == 2
    assert tasks.replay_dataset(str(tmp_path / "scored.jsonl"), fresh)["appended"] == 0
    assert stream_messages(client, fresh) == [other, revised[1]]


def test_failing_export_is_retried_then_failed_with_nothing_half_written(
        settings: Settings, client: redis.Redis, namespace: str, recorded: list[ScoredV1],
        tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "hf").write_text("a file where the dataset directory goes")
    job = enqueue(settings, tasks.export_dataset, namespace, TENANT, str(out),
                  retry=Retry(max=2), connection=client)
    metrics = run_worker(settings, client)

    job = fetch_job(job.id, client)
    assert job.get_status() == JobStatus.FAILED
    assert job.id in FailedJobRegistry(queue=job_queue(settings, client)).get_job_ids()
    result = job.latest_result()
    assert result is not None and "NotADirectoryError" in (result.exc_string or "")
    assert runs(metrics, "export_dataset", "failed") == 3  # the first run and two retries
    assert [p.name for p in out.iterdir()] == ["hf"]  # no scored.jsonl, no temp directory
    assert (out / "hf").read_text().startswith("a file")


# --- replay -----------------------------------------------------------------------------

def test_replay_into_a_fresh_namespace_equals_the_originals_once(
        settings: Settings, client: redis.Redis, namespace: str, recorded: list[ScoredV1],
        tmp_path: Path) -> None:
    tasks.export_dataset(namespace, TENANT, str(tmp_path))
    fresh = namespace + "-fresh"
    for _ in range(2):
        enqueue(settings, tasks.replay_dataset, str(tmp_path / "scored.jsonl"), fresh,
                connection=client)
    metrics = run_worker(settings, client)
    assert runs(metrics, "replay_dataset", "succeeded") == 2
    assert stream_messages(client, fresh) == recorded  # once, in order, equal

    # The hf/ data file replays too; a tenant filter; the scorer's marker is the guard.
    other = namespace + "-hf"
    result = tasks.replay_dataset(str(tmp_path / "hf" / HF_DATA_FILE), other, tenant=TENANT)
    assert result == {"namespace": other, "tenant": TENANT, "read": 4, "appended": 4,
                      "already_present": 0}
    assert stream_messages(client, other) == recorded
    assert tasks.replay_dataset(str(tmp_path / "scored.jsonl"), other)["appended"] == 0
    assert tasks.replay_dataset(str(tmp_path / "scored.jsonl"), namespace + "-x",
                                tenant="nobody")["read"] == 0


def test_replay_of_a_bad_file_appends_nothing(
        env: dict[str, str], client: redis.Redis, namespace: str, tmp_path: Path) -> None:
    good = {"message": scored("s1", 0, 1.0).model_dump(mode="json")}
    path = tmp_path / "scored.jsonl"
    path.write_bytes(orjson.dumps(good) + b"\n" + b'{"message": {"kind": "scored.v1"}}\n')
    with pytest.raises(tasks.ReplayFileError, match="line 2"):
        tasks.replay_dataset(str(path), namespace)
    assert client.exists(Keys(namespace).stream(SCORED)) == 0


# --- re-mining --------------------------------------------------------------------------

def answer(*skills: dict[str, str]) -> dict[str, Any]:
    return {"diagnosis": "The assistant guessed.", "skills": list(skills)}


async def mine_live(settings: Settings, messages: list[ScoredV1]) -> None:
    """What the skill-miner service does with these scored entries."""
    redis_client = connect(settings)
    miner = SkillMiner(settings, redis_client, MinerMetrics.create())
    await miner.start()
    try:
        for message in messages:
            await miner.on_scored(message, "0-0")
    finally:
        await miner.close()
        await redis_client.aclose()


def test_remine_creates_a_skill_from_a_session_mined_before(
        settings: Settings, client: redis.Redis, namespace: str, fake: FakeLLM) -> None:
    session = [scored("s1", 0, 1.0, user="Edit config.yaml"),
               scored("s1", 1, -1.0, user="Fix src/app.py", follow_up="That file is gone.")]
    publish(client, namespace, *session, scored("s2", 0, -1.0))
    asyncio.run(mine_live(settings, session))  # the LLM saw nothing reusable then
    keys = Keys(namespace)
    assert client.exists(keys.miner_done("mined", TENANT, session[1].turn.id))
    assert len(fake.requests) == 1

    fake.default = answer(FILE_SKILL)
    job = enqueue(settings, tasks.remine_session, namespace, TENANT, "s1", connection=client)
    metrics = run_worker(settings, client)
    result = fetch_job(job.id, client).return_value()
    assert runs(metrics, "remine_session", "succeeded") == 1
    assert result["turns"] == 2 and result["failing_turns"] == [session[1].turn.id]
    assert result["proposals"] == {"accepted": 1} and result["mined"] == {"proposed": 1}
    [skill] = result["skills"]
    assert skill["name"] == "verify-file-paths" and skill["status"] == "candidate"
    assert skill["turn_ids"] == [session[1].turn.id]
    assert len(fake.requests) == 2  # one turn of s1 asked again; s2 untouched
    prompt = json.dumps(fake.requests[-1]["messages"])
    assert "Fix src/app.py" in prompt and "Edit config.yaml" in prompt  # the trajectory

    again = tasks.remine_session(namespace, TENANT, "s1")  # the same answer: no new skill
    assert again["proposals"] == {} and [s["id"] for s in again["skills"]] == [skill["id"]]


# --- the CLI and the worker process ---------------------------------------------------

def test_cli_now_runs_inline_and_enqueue_prints_a_job_id(
        settings: Settings, client: redis.Redis, namespace: str, recorded: list[ScoredV1],
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert jobs_cli.main(["export", "--tenant", TENANT, "--out", str(tmp_path), "--now"]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == 4

    # Offline re-mining from the user's own correction, inline.
    monkeypatch.setenv("REEF_MINER_BACKEND", "corrections")
    publish(client, namespace, scored("s7", 0, -1.0, follow_up="Too long. Answer in at "
                                                                "most 12 words."))
    assert jobs_cli.main(["remine", "--tenant", TENANT, "--session", "s7", "--now"]) == 0
    remined = json.loads(capsys.readouterr().out)
    assert remined["proposals"] == {"accepted": 1}
    assert remined["skills"][0]["turn_ids"] == [f"{TENANT}-s7-0"]

    fresh = namespace + "-cli"
    assert jobs_cli.main(["replay", str(tmp_path / "scored.jsonl"), "--namespace", fresh]) == 0
    job_id = capsys.readouterr().out.strip()
    assert client.llen(f"rq:queue:{queue_name(namespace)}") == 1  # the environment's queue
    run_worker(settings, client)
    assert jobs_cli.main(["status", job_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "finished" and status["result"]["appended"] == 4
    assert stream_messages(client, fresh) == recorded
    assert jobs_cli.main(["status", "no-such-job"]) == 2


def test_worker_process_runs_jobs_until_sigterm(
        env: dict[str, str], redis_server: RedisServer, client: redis.Redis, namespace: str,
        recorded: list[ScoredV1], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    worker = ServiceProcess("services.jobs", {**env, "REEF_METRICS_PORT": str(port)},
                            tmp_path / "data", port, "/healthz")
    worker.start()
    try:
        code = jobs_cli.main(["export", "--tenant", TENANT, "--out", str(tmp_path / "out"),
                              "--wait", "--timeout", "30"])
        lines = capsys.readouterr().out.split("\n", 1)
        assert code == 0, lines
        assert json.loads(lines[1])["result"]["exported"] == 4
        info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url",
                               redis_server.url, queue_name(namespace)],
                              capture_output=True, text=True, timeout=30, check=True)
        assert queue_name(namespace) in info.stdout
        assert "1 workers" in info.stdout or "1 worker" in info.stdout
        scraped = httpx.get(worker.url + "/metrics", timeout=5).text
        assert 'reef_jobs_runs_total{job="export_dataset",outcome="succeeded"} 1.0' in scraped
    finally:
        assert worker.proc is not None
        worker.proc.terminate()
        exit_code = worker.proc.wait(15)
    assert exit_code == 0
    log = worker.log_path.read_text().splitlines()
    events = [json.loads(line)["event"] for line in log if line.startswith("{")]
    assert "jobs.exported" in events and events[-1] == "jobs.worker_stopped"
    assert all(line.startswith("{") for line in log if line.strip()), log[:5]
    assert sorted(os.listdir(tmp_path / "out")) == ["hf", "scored.jsonl"]
