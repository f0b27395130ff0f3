"""``reef openclaw``: point an OpenClaw install at Reef.

OpenClaw reads its settings from ``~/.openclaw/openclaw.json`` (or the file
``OPENCLAW_CONFIG_PATH`` names), a JSON5 file. This command adds (or updates) a provider
``reef`` under ``models.providers`` -- Reef's gateway as an OpenAI-compatible endpoint
(``api: "openai-completions"``) with its base URL, API key and model -- and makes
``reef/<model>`` the default model (``agents.defaults.model.primary``; also added to
``agents.defaults.models`` when that allowlist exists). Everything else in the file is
kept as it was. A backup of the file is written first; a second run with the same
arguments changes nothing and writes nothing.

The file is read as JSON5 (comments, trailing commas, unquoted keys, single-quoted
strings); what this reader does not understand is refused with the line it stopped at,
and the file is left alone. It is written back as plain JSON (which is JSON5): comments
are not kept -- the backup has them.

Without ``--base-url``/``--api-key``/``--model`` the values come from a stack started
with ``reef dev`` (its ``stack.json``) when one is there, else the gateway address and
model of Reef's settings; the key must then be given. ``--api-key-env NAME`` writes
``${NAME}`` instead of the key, which OpenClaw reads from its environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.stack.launch import STATE_FILE, StackInfo
from shared.settings import Settings

PROVIDER = "reef"
"""The provider id written under ``models.providers``."""
API = "openai-completions"
"""OpenClaw's name for an OpenAI chat-completions endpoint."""
INCLUDE = "$include"
"""OpenClaw's key for an object read from another file; this command edits one file only."""
READONLY_ENV = ("OPENCLAW_CONFIG_READONLY", "OPENCLAW_NIX_MODE")
"""Set to 1, OpenClaw treats its config as managed elsewhere; so does this command."""
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
"""The names OpenClaw substitutes in ``${NAME}``."""


class OpenClawConfigError(ValueError):
    """The OpenClaw config cannot be read or does not have the expected shape."""


@dataclass(frozen=True)
class ReefTarget:
    """What OpenClaw should call: Reef's gateway, a key and a model it serves."""

    base_url: str
    api_key: str
    model: str
    provider: str = PROVIDER

    @property
    def ref(self) -> str:
        """The model reference OpenClaw uses: ``<provider>/<model>``."""
        return f"{self.provider}/{self.model}"


# --- reading JSON5 ---------------------------------------------------------------------

_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "0": "\0"}
_IDENT_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The value of the JSON5 string literal at ``start`` and the index after it."""
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\n":
            break
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1: i + 2]
        if nxt in ("u", "x"):
            width = 4 if nxt == "u" else 2
            digits = text[i + 2: i + 2 + width]
            if not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != width:
                raise OpenClawConfigError(f"bad \\{nxt} escape at line {_line_of(text, i)}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
            continue
        if nxt == "\n":  # a line continuation
            i += 2
            continue
        out.append(_ESCAPES.get(nxt, nxt))
        i += 2
    raise OpenClawConfigError(f"unterminated string at line {_line_of(text, start)}")


def _drop_trailing_comma(out: list[str]) -> None:
    for k in range(len(out) - 1, -1, -1):
        if out[k] == ",":
            out[k] = ""
            return
        if out[k].strip():
            return


def _to_json(text: str) -> str:
    """JSON5 text as JSON text, newlines kept so that error lines match the file."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            value, i = _read_string(text, i)
            out.append(json.dumps(value, ensure_ascii=False))
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise OpenClawConfigError(f"unterminated comment at line {_line_of(text, i)}")
            out.append("\n" * text.count("\n", i, end))
            i = end + 2
        elif (ident := _IDENT_RE.match(text, i)) is not None:
            word, i = ident.group(), ident.end()
            is_key = text[i:].lstrip(" \t\r\n").startswith(":")
            out.append(json.dumps(word) if is_key else word)
        else:
            if c in "}]":
                _drop_trailing_comma(out)
            out.append(c)
            i += 1
    return "".join(out)


def parse_json5(text: str) -> Any:
    """The value of a JSON5 document (the subset OpenClaw's own examples use: comments,
    trailing commas, unquoted keys, single quotes); ``OpenClawConfigError`` naming the
    line for anything else."""
    converted = _to_json(text)
    try:
        return json.loads(converted)
    except json.JSONDecodeError as exc:
        raise OpenClawConfigError(f"not JSON5 this command can read at line {exc.lineno}, "
                                  f"column {exc.colno}: {exc.msg}") from None


# --- changing the config ---------------------------------------------------------------

def _object_at(root: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The object at ``path`` in ``root``, created empty where missing."""
    node = root
    for depth, name in enumerate(path):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            where = ".".join(path[:depth + 1])
            raise OpenClawConfigError(f"'{where}' is {type(child).__name__}, not an object")
        if INCLUDE in child:
            where = ".".join(path[:depth + 1])
            raise OpenClawConfigError(f"'{where}' comes from {INCLUDE}: edit the included "
                                      "file by hand (see the README)")
        node = child
    return node


def _set_provider(config: dict[str, Any], target: ReefTarget) -> None:
    providers = _object_at(config, ("models", "providers"))
    entry = _object_at(providers, (target.provider,))
    entry.update(baseUrl=target.base_url, apiKey=target.api_key, api=API)
    models = entry.setdefault("models", [])
    if not isinstance(models, list):
        raise OpenClawConfigError(f"'models.providers.{target.provider}.models' is "
                                  f"{type(models).__name__}, not a list")
    if not any(isinstance(m, dict) and m.get("id") == target.model for m in models):
        models.append({"id": target.model, "name": f"{target.model} (via Reef)"})


def _set_default(config: dict[str, Any], target: ReefTarget) -> None:
    defaults = _object_at(config, ("agents", "defaults"))
    current = defaults.get("model")
    if current is None or isinstance(current, str):  # a bare string is the short form
        defaults["model"] = {"primary": target.ref} if current is None else target.ref
    elif isinstance(current, dict):
        current["primary"] = target.ref  # fallbacks stay
    else:
        raise OpenClawConfigError(f"'agents.defaults.model' is {type(current).__name__}, "
                                  "not an object or a string")
    allowlist = defaults.get("models")
    if isinstance(allowlist, dict) and target.ref not in allowlist:
        allowlist[target.ref] = {}  # only where an allowlist exists: creating one would
        # forbid every other model


def point_at_reef(config: Any, target: ReefTarget, set_default: bool = True) -> dict[str, Any]:
    """A copy of ``config`` with the Reef provider added or updated (and the default model
    set to it); ``config`` is not changed."""
    if not isinstance(config, dict):
        raise OpenClawConfigError(f"the file holds a {type(config).__name__}, not an object")
    new = copy.deepcopy(config)
    _set_provider(new, target)
    if set_default:
        _set_default(new, target)
    return new


# --- the file --------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What ``apply`` did."""

    changed: bool
    backup: Path | None
    comments_dropped: bool
    previous_default: Any


def default_config_path() -> Path:
    """Where OpenClaw reads its config: ``OPENCLAW_CONFIG_PATH``, else ``~/.openclaw``."""
    named = os.environ.get("OPENCLAW_CONFIG_PATH")
    return Path(named).expanduser() if named else Path.home() / ".openclaw" / "openclaw.json"


def _backup(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = path.with_name(f"{path.name}.reef-backup-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.reef-backup-{stamp}-{n}")
    backup.write_bytes(path.read_bytes())
    os.chmod(backup, path.stat().st_mode & 0o777)
    return backup


def _write(path: Path, config: dict[str, Any], mode: int) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply(path: Path, target: ReefTarget, set_default: bool = True) -> Outcome:
    """Point the OpenClaw config at ``path`` at Reef (created when missing). Raises
    ``OpenClawConfigError`` (the file untouched) when it cannot be read or has an
    unexpected shape."""
    for name in READONLY_ENV:
        if os.environ.get(name) == "1":
            raise OpenClawConfigError(f"{name}=1: the OpenClaw config is managed elsewhere; "
                                      "nothing was changed")
    path = path.expanduser().resolve()  # a symlinked config keeps its link
    text = path.read_text(encoding="utf-8") if path.exists() else "{}"
    try:
        config = parse_json5(text)
        new = point_at_reef(config, target, set_default)
    except OpenClawConfigError as exc:
        raise OpenClawConfigError(f"{path}: {exc}. The file was not changed.") from None
    previous = ((config.get("agents") or {}).get("defaults") or {}).get("model")
    if new == config:
        return Outcome(False, None, False, previous)
    backup = _backup(path) if path.exists() else None
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600  # it holds keys
    _write(path, new, mode)
    try:
        json.loads(text)
        plain = True
    except json.JSONDecodeError:
        plain = False
    return Outcome(True, backup, not plain, previous)


# --- the command -----------------------------------------------------------------------

def _defaults(settings: Settings) -> dict[str, str]:
    """Base URL, key and model of a ``reef dev`` stack, else from the settings."""
    state = Path(settings.data_dir) / STATE_FILE
    if state.is_file():
        info = StackInfo.from_file(state)
        return {"base_url": info.gateway_url + "/v1", "api_key": info.api_key,
                "model": info.model}
    host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::") else settings.gateway_host
    model = (settings.served_model_names or [settings.model_name])[0]
    return {"base_url": f"http://{host}:{settings.gateway_port}/v1", "api_key": "",
            "model": model}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reef openclaw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="OpenClaw's config file (default: $OPENCLAW_CONFIG_PATH or "
                             "~/.openclaw/openclaw.json)")
    parser.add_argument("--base-url", help="Reef's gateway, ending in /v1")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="a Reef API key (one of REEF_API_KEYS)")
    key.add_argument("--api-key-env", metavar="NAME",
                     help="write ${NAME} instead of the key; OpenClaw reads it from its env")
    parser.add_argument("--model", help="the model name to send (one the gateway serves)")
    parser.add_argument("--provider", default=PROVIDER, help="provider id (default: reef)")
    parser.add_argument("--no-default", action="store_true",
                        help="add the provider, leave the default model as it is")
    return parser


def _target(args: argparse.Namespace, settings: Settings) -> ReefTarget:
    found = _defaults(settings)
    if args.api_key_env is not None:
        if not ENV_NAME_RE.match(args.api_key_env):
            raise OpenClawConfigError("--api-key-env: OpenClaw substitutes upper-case names "
                                      "only ([A-Z_][A-Z0-9_]*)")
        api_key = "${" + args.api_key_env + "}"
    else:
        api_key = args.api_key or found["api_key"]
    if not api_key:
        raise OpenClawConfigError("no API key: give --api-key KEY or --api-key-env NAME "
                                  "(no `reef dev` stack found to take one from)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.provider):
        raise OpenClawConfigError(f"--provider {args.provider!r}: letters, digits, '-', "
                                  "'_' and '.'")
    base_url = (args.base_url or found["base_url"]).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise OpenClawConfigError(f"--base-url {base_url!r}: an http:// or https:// URL of "
                                  "Reef's gateway, e.g. http://127.0.0.1:8000/v1")
    return ReefTarget(base_url=base_url, api_key=api_key, model=args.model or found["model"],
                      provider=args.provider)


def main(argv: list[str], settings: Settings) -> int:
    args = _parser().parse_args(argv)
    path = args.config or default_config_path()
    try:
        target = _target(args, settings)
        outcome = apply(path, target, set_default=not args.no_default)
    except OpenClawConfigError as exc:
        print(f"reef openclaw: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"reef openclaw: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not outcome.changed:
        print(f"{path} already points OpenClaw at Reef ({target.ref} at {target.base_url}); "
              "nothing changed.")
        return 0
    print(f"OpenClaw now calls Reef: provider '{target.provider}' -> {target.base_url}, "
          f"model {target.ref}" + ("" if args.no_default else " (the default model)") + ".")
    if outcome.backup is not None:
        print(f"The previous file is in {outcome.backup}"
              + (f" (default model was {json.dumps(outcome.previous_default)})."
                 if outcome.previous_default and not args.no_default else "."))
    if outcome.comments_dropped:
        print("The file was JSON5; it is now plain JSON (still valid JSON5), without its "
              "comments: they are kept in the backup.")
    print("A running OpenClaw gateway reloads the file by itself; check it with "
          "`openclaw config validate` and `openclaw models status`.")
    return 0
