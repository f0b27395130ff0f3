"""The dashboard page end to end: a gateway process (in front of the fake upstream) on a
real Redis, real data put in through the gateway and as valid stream messages, the JSON
route read with httpx, and the page rendered by headless Chromium driven by selenium."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from services.gateway.dashboard import ScoredTail, preview, scored_summary
from shared.keys import SCORED, TURNS, WEIGHTS, Keys
from shared.messages import ScoredV1, WeightsEventV1
from shared.redact import Redactor
from shared.skill_store import SkillStore
from tests.conftest import RedisServer
from tests.fake_upstream import FakeUpstream
from tests.gateway_proc import API_KEY, GatewayProcess
from tests.test_gateway import wait_turn

ADMIN_KEY = "sk-admin-dashboard-key-5678"
NAMESPACE = "dash" + uuid.uuid4().hex[:8]
SESSION = "dash-session-1"
SECRET = "sk-live-abcdefghijklmnopqrstuvwx"
REWARDS = [0.75, -0.5, 0.25]
CHROMIUM = os.environ.get("REEF_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("REEF_CHROMEDRIVER", "/usr/bin/chromedriver")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, upstream: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(redis_server.url, upstream.base_url, NAMESPACE,
                        tmp_path_factory.mktemp("gateway"), env={"REEF_ADMIN_KEY": ADMIN_KEY})
    gw.start()
    yield gw
    gw.stop()


def data(gateway: GatewayProcess, **params: str) -> dict[str, Any]:
    resp = httpx.get(gateway.url + "/admin/dashboard/data", params=params, timeout=10,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def publish_weights(client: redis.Redis, version: int) -> None:
    event = WeightsEventV1(tenant="*", adapter=f"reef-v{version}", version=version,
                           path=f"/ckpt/v{version}", step=10 * version,
                           metrics={"loss": 0.5 / version, "reward_mean": 0.1 * version})
    client.xadd(Keys(NAMESPACE).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]


async def credit_skill(redis_url: str, skill_id: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = SkillStore(client, Keys(NAMESPACE), 10_000)
    for reward in (0.5, 0.5):
        await store.add_credit("alpha", [skill_id], reward, [])
    await client.aclose()


@pytest.fixture(scope="module")
def populated(gateway: GatewayProcess, redis_server: RedisServer) -> GatewayProcess:
    """Chats through the gateway, their turns scored, three weight versions (the gateway
    loads them upstream), an active skill with credit, a dead letter and a busy group."""
    client = redis_server.client()
    keys = Keys(NAMESPACE)
    chat = openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    questions = ["What is the capital of France?",
                 f"My key is {SECRET}, mail me at bob@example.com",
                 "Thanks!"]
    messages: list[Any] = []
    for text in questions:
        messages.append({"role": "user", "content": text})
        answer = chat.chat.completions.create(model="fake-text", messages=messages,
                                              extra_headers={"X-Session-Id": SESSION})
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    turns = sorted(wait_turn(redis_server, SESSION, 3, namespace=NAMESPACE),
                   key=lambda t: t.turn_index)
    for turn, reward in zip(turns, REWARDS, strict=True):
        scored = ScoredV1(turn=turn, reward=reward, components={"implicit": reward})
        client.xadd(keys.stream(SCORED), scored.to_fields())  # type: ignore[arg-type]
    for version in (1, 2, 3):
        publish_weights(client, version)
    resp = httpx.post(gateway.url + "/admin/tenants/alpha/skills", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"name": "answer-first", "description": "When asked a question.",
                            "body": "Answer in the first sentence.", "status": "active"})
    assert resp.status_code == 201, resp.text
    asyncio.run(credit_skill(redis_server.url, resp.json()["id"]))
    client.xadd(keys.dead(TURNS), {"kind": "turn.v1", "data": "not json"})
    client.xgroup_create(keys.stream(SCORED), "trainer", id="0")
    client.xreadgroup("trainer", "t1", {keys.stream(SCORED): ">"}, count=1)
    wait_for(lambda: [v["version"] for v in data(gateway)["weights"]["live"]] == [3])
    return gateway


def assert_openai_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["message"])


def test_the_data_route_needs_the_admin_key(gateway: GatewayProcess) -> None:
    url = gateway.url + "/admin/dashboard/data"
    assert_openai_error(httpx.get(url), 401)
    assert_openai_error(httpx.get(url, headers={"Authorization": "Bearer sk-wrong-key"}), 401)
    message = assert_openai_error(
        httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}), 403)
    assert "inference" in message
    bad_tenant = httpx.get(url, params={"tenant": "a b"},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_openai_error(bad_tenant, 400)


def test_redis_away_is_a_503_in_openai_shape(upstream: FakeUpstream, tmp_path: Path) -> None:
    own_redis = RedisServer(tmp_path)
    own_redis.start()
    gw = GatewayProcess(own_redis.url, upstream.base_url, NAMESPACE, tmp_path / "gw",
                        env={"REEF_ADMIN_KEY": ADMIN_KEY})
    gw.start()
    try:
        assert data(gw)["queues"][0]["length"] == 0
        own_redis.kill()
        resp = httpx.get(gw.url + "/admin/dashboard/data", timeout=15,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert "unreachable" in assert_openai_error(resp, 503)
        assert resp.headers["retry-after"] == "1"
    finally:
        gw.stop()
        own_redis.kill()


def test_the_page_holds_no_data_and_runs_only_its_own_script(gateway: GatewayProcess) -> None:
    page = httpx.get(gateway.url + "/admin/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="login"' in page.text and "<script>" not in page.text
    script = httpx.get(gateway.url + "/admin/dashboard/static/dashboard.js")
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert_openai_error(httpx.get(gateway.url + "/admin/dashboard/static/..%2Fapp.py"), 404)


def test_the_data_route_reads_real_data(populated: GatewayProcess) -> None:
    body = data(populated)
    assert body["reward"]["count"] == 3
    assert [p[1] for p in body["reward"]["points"]] == REWARDS  # oldest first
    assert body["reward"]["mean"] == pytest.approx(sum(REWARDS) / 3)
    newest = body["turns"][0]
    assert (newest["session_id"], newest["turn_index"], newest["reward"]) == (SESSION, 2, 0.25)
    secret_turn = body["turns"][1]
    assert SECRET not in str(body) and "bob@example.com" not in str(body)
    assert "[REDACTED_API_KEY]" in secret_turn["user"]
    assert "[REDACTED_EMAIL]" in secret_turn["user"]
    assert [e["version"] for e in body["weights"]["events"]] == [3, 2, 1]
    assert [e["live"] for e in body["weights"]["events"]] == [True, False, False]
    newest_weights = body["weights"]["events"][0]
    assert newest_weights["loss"] == pytest.approx(0.5 / 3)
    assert newest_weights["batch_reward"] == pytest.approx(0.3)
    skill = next(s for s in body["skills"] if s["name"] == "answer-first")
    assert (skill["status"], skill["with_count"], skill["with_mean"]) == ("active", 2, 0.5)
    queues = {q["stream"]: q for q in body["queues"]}
    assert queues["turns"]["length"] == 3 and queues["turns"]["dead_letters"] == 1
    assert queues["scored"]["length"] == 3
    assert queues["scored"]["groups"] == [{"name": "trainer", "consumers": 1, "pending": 1,
                                           "lag": 2, "last_delivered_id": oldest_id(body)}]
    assert "alpha" in body["tenants"]
    assert data(populated, tenant="beta")["reward"]["count"] == 0


def oldest_id(body: dict[str, Any]) -> str:
    """The id of the oldest scored entry (the one the group read)."""
    return str(body["turns"][-1]["entry_id"])


def test_the_scored_tail_keeps_the_newest_entries_newest_first() -> None:
    def entries(*ids: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        turn = {"tenant": "alpha", "session_id": "s", "messages": []}
        return [(f"{i}-0".encode(), {b"kind": b"scored.v1", b"data": orjson.dumps(
            {"reward": i / 10, "created_at": float(i), "turn": turn})}) for i in ids]

    tail = ScoredTail(3)
    assert tail.min_id == "-"
    tail.add(entries(2, 1))  # XREVRANGE answers newest first
    assert tail.min_id == "(2-0"
    tail.add([*entries(5, 4, 3), (b"9-9", {b"kind": b"other.v1", b"data": b"{}"})])
    assert [r["entry_id"] for r in tail.rows] == ["5-0", "4-0", "3-0"]
    summary = scored_summary(tail.rows, None)
    assert summary["points"] == [[3.0, 0.3], [4.0, 0.4], [5.0, 0.5]]
    assert scored_summary(tail.rows, "beta")["count"] == 0


def test_preview_is_one_redacted_line_redacted_before_it_is_cut() -> None:
    text = preview("Bearer abcdefghijkl token=hunter22 call +44 20 7946 0958 at 10.1.2.3\n"
                   "ghp_abcdefghijklmnopqrstuvwxyz")
    for leaked in ("abcdefghijkl", "hunter22", "7946", "10.1.2.3", "ghp_", "\n"):
        assert leaked not in text
    long = preview("x" * 500)
    assert long.endswith("…") and len(long) == 140
    key = "sk-" + "a" * 40  # would be cut in half at 140 characters
    assert "aaaa" not in preview("y" * 120 + " " + key)
    assert "[REDACTED_CUSTOM]" in preview("ticket ACME-1234", Redactor(["ACME-\\d+"]))


def _browser() -> Any:
    """A headless Chromium through chromedriver; skipped only where neither is installed and
    this is not CI (CI installs both: make install-test-system)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed (make install-test-system installs chromium)")
        pytest.skip(f"{missing} not installed: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_the_page_renders_real_data_in_chromium(populated: GatewayProcess,
                                                redis_server: RedisServer,
                                                tmp_path: Path) -> None:
    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(populated.url + "/admin/dashboard?refresh=1")
        wait = WebDriverWait(driver, 10)

        def text(css: str) -> str:
            """The rendered text of ``css``, read in one script call: the page re-renders
            every second, so an element found in one call may be gone by the next."""
            found = driver.execute_script(
                "const e = document.querySelector(arguments[0]); return e && e.innerText;", css)
            return str(found or "").strip()

        def count(css: str) -> int:
            return int(driver.execute_script(
                "return document.querySelectorAll(arguments[0]).length;", css))

        driver.find_element(By.ID, "key").send_keys("sk-not-the-admin-key\n")
        wait.until(lambda _: "Incorrect admin key" in text("#login-error"))
        assert driver.execute_script("return document.getElementById('panels').hidden")

        driver.find_element(By.ID, "key").send_keys(ADMIN_KEY + "\n")
        wait.until(lambda _: text("#live-versions tbody td.version") == "v3")
        assert driver.execute_script("return sessionStorage.getItem('reef.adminKey')") == ADMIN_KEY
        assert text("#reward-count") == "3"
        assert count("#reward-chart circle.dot") == 3
        turns = text("#turns tbody")
        assert "+0.750" in turns and "-0.500" in turns and SESSION in turns
        assert "[REDACTED_API_KEY]" in turns and SECRET not in driver.page_source
        assert "answer-first" in text("#skills tbody")
        assert text("#skills tbody tr:first-child td:nth-child(7)") == "+0.500"
        assert text("#queues tr[data-stream=scored] td.length") == "3"
        assert text("#queues tr[data-stream=turns] td.dead") == "1"
        assert "trainer: 1 pending / 2 lag / 1 consumers" in text("#queues")
        assert text("#swaps tbody tr:first-child .badge") == "live"
        assert text("#live-headline") == "v3 (reef-v3)"
        assert "+0.300" in text("#swaps tbody tr:first-child")

        # One tenant's view: beta has no scored turns; back to all tenants.
        tenant = Select(driver.find_element(By.ID, "tenant"))
        tenant.select_by_value("beta")
        wait.until(lambda _: text("#reward-count") == "0")
        assert text("#turns tbody") == "no scored turns yet"
        tenant.select_by_value("")
        wait.until(lambda _: text("#reward-count") == "3")

        # It refreshes by itself: a new version and a new scored turn show up.
        publish_weights(redis_server.client(), 4)
        turn = wait_turn(redis_server, SESSION, 3, namespace=NAMESPACE)[0]
        scored = ScoredV1(turn=turn, reward=0.9)
        redis_server.client().xadd(Keys(NAMESPACE).stream(SCORED),
                                   scored.to_fields())  # type: ignore[arg-type]
        wait.until(lambda _: text("#live-versions tbody td.version") == "v4")
        wait.until(lambda _: text("#reward-count") == "4")
        assert text("#turns tbody tr:first-child td:nth-child(5)") == "+0.900"
        driver.save_screenshot(str(tmp_path / "dashboard.png"))
    finally:
        driver.quit()
