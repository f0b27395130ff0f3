"""``reef openclaw`` on temporary OpenClaw config files: the provider and default model are
set, everything else is kept, a backup is written, a second run changes nothing, and a
file it cannot read is refused and left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.stack import openclaw
from services.stack.launch import STATE_FILE, StackInfo
from services.stack.openclaw import OpenClawConfigError, parse_json5
from shared.settings import Settings

KEY = "sk-reef-test-key-0123456789"
MODEL = "SmolLM2-135M-Instruct"
BASE_URL = "http://127.0.0.1:8123/v1"

JSON5_CONFIG = """\
// OpenClaw config, as a person writes it: comments, trailing commas, bare keys.
{
  agents: {
    defaults: {
      model: { primary: 'anthropic/claude-sonnet-4-5', fallbacks: ["openai/gpt-5.2",], },
      workspace: "~/.openclaw/workspace",  // where the agent works
    },
  },
  /* custom providers */
  models: {
    mode: "merge",
    providers: {
      "custom-proxy": {
        baseUrl: "http://localhost:4000/v1",  // a // inside a string is not a comment
        apiKey: "${LITELLM_KEY}",
        api: "openai-completions",
        models: [{ id: "llama-3.1-8b", name: 'Llama \\'3.1\\' 8B', contextWindow: 128000 }],
      },
    },
  },
  channels: { telegram: { enabled: true, botToken: "123:abc", allowFrom: ["tg:1",] } },
}
"""


def run(config: Path, *extra: str, settings: Settings | None = None) -> int:
    args = ["--config", str(config), "--model", MODEL, "--base-url", BASE_URL, *extra]
    if "--api-key-env" not in extra and "--api-key" not in extra:
        args += ["--api-key", KEY]
    return openclaw.main(args, settings or Settings(profile="dev"))


def backups(config: Path) -> list[Path]:
    return sorted(config.parent.glob(config.name + ".reef-backup-*"))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / ".openclaw" / "openclaw.json"
    path.parent.mkdir()
    path.write_text(JSON5_CONFIG)
    path.chmod(0o600)
    return path


def test_parse_json5_reads_what_openclaw_users_write() -> None:
    parsed = parse_json5(JSON5_CONFIG)
    provider = parsed["models"]["providers"]["custom-proxy"]
    assert provider["baseUrl"] == "http://localhost:4000/v1"
    assert provider["models"][0]["name"] == "Llama '3.1' 8B"
    assert parsed["agents"]["defaults"]["model"]["fallbacks"] == ["openai/gpt-5.2"]
    assert parse_json5('{a: "x\\u00e9\\n", b: [1, 2e3, -0.5, true, null,],}') == {
        "a": "xé\n", "b": [1, 2000.0, -0.5, True, None]}
    for bad in ("{a: 0x1F}", '{"a": 1', "{a: 'open}", "{a: 1} /* open"):
        with pytest.raises(OpenClawConfigError):
            parse_json5(bad)


def test_adds_the_provider_sets_the_default_and_keeps_the_rest(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = parse_json5(JSON5_CONFIG)
    assert run(config) == 0
    after = json.loads(config.read_text())  # plain JSON now
    assert after["models"]["providers"]["reef"] == {
        "baseUrl": BASE_URL, "apiKey": KEY, "api": "openai-completions",
        "models": [{"id": MODEL, "name": f"{MODEL} (via Reef)"}]}
    assert after["agents"]["defaults"]["model"] == {"primary": f"reef/{MODEL}",
                                                    "fallbacks": ["openai/gpt-5.2"]}
    # Everything else is as it was.
    assert after["models"]["providers"]["custom-proxy"] == before["models"]["providers"][
        "custom-proxy"]
    assert after["channels"] == before["channels"]
    assert after["models"]["mode"] == "merge"
    assert after["agents"]["defaults"]["workspace"] == "~/.openclaw/workspace"
    assert set(after) == set(before)
    # The backup is the file as it was, byte for byte, and as private.
    [backup] = backups(config)
    assert backup.read_text() == JSON5_CONFIG
    assert oct(backup.stat().st_mode & 0o777) == oct(config.stat().st_mode & 0o777) == "0o600"
    out = capsys.readouterr().out
    assert str(backup) in out and "comments" in out and KEY not in out


def test_a_second_run_changes_nothing(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config) == 0
    written = config.read_bytes()
    mtime = config.stat().st_mtime_ns
    assert run(config) == 0
    assert config.read_bytes() == written and config.stat().st_mtime_ns == mtime
    assert len(backups(config)) == 1
    assert "nothing changed" in capsys.readouterr().out


def test_updates_an_existing_reef_provider_in_place(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    old: dict[str, Any] = {
        "models": {"providers": {"reef": {
            "baseUrl": "http://old:8000/v1", "apiKey": "sk-old", "api": "openai-completions",
            "headers": {"X-Team": "a"}, "models": [{"id": "old-model", "name": "Old"}]}}},
        "agents": {"defaults": {"model": "anthropic/claude-sonnet-4-5",
                                "models": {"anthropic/claude-sonnet-4-5": {"alias": "s"}}}}}
    path.write_text(json.dumps(old))
    assert run(path) == 0
    new = json.loads(path.read_text())
    reef = new["models"]["providers"]["reef"]
    assert (reef["baseUrl"], reef["apiKey"], reef["headers"]) == (BASE_URL, KEY, {"X-Team": "a"})
    assert [m["id"] for m in reef["models"]] == ["old-model", MODEL]
    assert new["agents"]["defaults"]["model"] == f"reef/{MODEL}"  # the short form stays short
    # The allowlist existed, so the new model is on it (else OpenClaw would refuse it).
    assert new["agents"]["defaults"]["models"] == {
        "anthropic/claude-sonnet-4-5": {"alias": "s"}, f"reef/{MODEL}": {}}


def test_no_allowlist_is_created_and_no_default_is_optional(tmp_path: Path) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text('{"agents": {"defaults": {"model": {"primary": "openai/gpt-5.2"}}}}')
    assert run(path, "--no-default") == 0
    new = json.loads(path.read_text())
    assert new["agents"]["defaults"] == {"model": {"primary": "openai/gpt-5.2"}}
    assert "reef" in new["models"]["providers"]


@pytest.mark.parametrize("text, words", [
    ('{"models": {"providers": {"a": {}}', "line 1"),
    ('{\n  models: {\n    providers: [1, 2],\n  },\n}\n', "'models.providers' is list"),
    ('{"agents": {"defaults": {"model": 3}}}', "'agents.defaults.model' is int"),
    ("[1, 2]", "not an object"),
    ('{\n  "a": 1,\n  "b": 0x10,\n}', "line 3"),
    ('{"models": {"$include": "./models.json5"}}', "$include"),
])
def test_a_file_it_cannot_read_is_refused_and_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str) -> None:
    path = tmp_path / "openclaw.json"
    path.write_text(text)
    assert run(path) == 1
    err = capsys.readouterr().err
    assert words in err and "not changed" in err
    assert path.read_text() == text
    assert backups(path) == []


def test_a_missing_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "openclaw.json"
    assert run(path, "--api-key-env", "REEF_API_KEY") == 0
    new = json.loads(path.read_text())
    assert new["models"]["providers"]["reef"]["apiKey"] == "${REEF_API_KEY}"
    assert new["agents"]["defaults"]["model"] == {"primary": f"reef/{MODEL}"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert backups(path) == []


def test_bad_arguments_and_a_read_only_config_are_refused(
        config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    assert run(config, "--api-key-env", "lower_case") == 1
    assert "upper-case" in capsys.readouterr().err
    assert openclaw.main(["--config", str(config), "--api-key", KEY, "--base-url",
                          "127.0.0.1:8000/v1"], Settings(profile="dev")) == 1
    assert "http://" in capsys.readouterr().err
    no_key = openclaw.main(["--config", str(config)], Settings(profile="dev", data_dir=tmp_path))
    assert no_key == 1 and "--api-key" in capsys.readouterr().err
    monkeypatch.setenv("OPENCLAW_CONFIG_READONLY", "1")
    assert run(config) == 1
    assert "managed elsewhere" in capsys.readouterr().err
    assert config.read_text() == JSON5_CONFIG


def test_defaults_come_from_a_running_dev_stack(tmp_path: Path, config: Path) -> None:
    info = StackInfo(gateway_url="http://127.0.0.1:8999", api_key="sk-dev-stack-key-42",
                     redis_url="redis://127.0.0.1:6379/0", model="dev-model",
                     namespace="reef", policy_url="http://127.0.0.1:8001")
    (tmp_path / STATE_FILE).write_text(info.to_json())
    settings = Settings(profile="dev", data_dir=tmp_path)
    assert openclaw.main(["--config", str(config)], settings) == 0
    reef = json.loads(config.read_text())["models"]["providers"]["reef"]
    assert (reef["baseUrl"], reef["apiKey"]) == ("http://127.0.0.1:8999/v1", "sk-dev-stack-key-42")
    assert reef["models"][0]["id"] == "dev-model"


def test_the_reef_command_runs_it(config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "REEF_DATA_DIR": str(tmp_path / "data"),
           "OPENCLAW_CONFIG_PATH": str(config)}
    done = subprocess.run([sys.executable, "-m", "services.stack", "openclaw",
                           "--api-key", KEY, "--model", MODEL],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    primary = json.loads(config.read_text())["agents"]["defaults"]["model"]["primary"]
    assert primary == f"reef/{MODEL}"
