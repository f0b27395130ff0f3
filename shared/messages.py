"""The messages carried by Reef's streams.

Each is a frozen pydantic model with a versioned ``kind`` and a producer-set ``id`` that
consumers use as the idempotency key. On the wire a stream entry has two fields:
``kind`` and ``data`` (the model as JSON). Nothing is pickled. A breaking change gets a
new kind (``turn.v2``); consumers accept both while producers move over.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

_PROCESS_TAG = uuid.uuid4().hex[:12]
_SEQUENCE = itertools.count()


def _new_process_tag() -> None:
    global _PROCESS_TAG
    _PROCESS_TAG = uuid.uuid4().hex[:12]


os.register_at_fork(after_in_child=_new_process_tag)


def new_id() -> str:
    """A producer-set message id: creation time, a random tag drawn once per process, and
    a per-process sequence number (unique without drawing randomness per message)."""
    return f"{time.time_ns():x}-{_PROCESS_TAG}-{next(_SEQUENCE):x}"


class Message(BaseModel):
    """Base of every stream message."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: str
    id: str = Field(default_factory=new_id)
    created_at: float = Field(default_factory=time.time)
    _raw: bytes | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        """Equal when of the same type with the same fields (``_raw`` is a cache)."""
        if not isinstance(other, Message):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def json_bytes(self) -> bytes:
        """The message as JSON: the bytes it was decoded from when there are any (no
        re-serialisation on a hot path), else a fresh dump."""
        return self._raw if self._raw is not None else self.model_dump_json().encode()

    def to_fields(self) -> dict[str, bytes]:
        """The stream entry for this message."""
        return {"kind": self.kind.encode(), "data": orjson.dumps(self.model_dump(mode="json"))}


SAMPLING_HEADER = "x-reef-sampling"
"""Response header by which Reef's policy server states how it sampled an answer: a JSON
object with ``logprobs_kind`` (``processed``, ``raw`` or null for unknown) and the
effective ``temperature``, ``top_p``, ``top_k``, ``seed`` and ``greedy``. The gateway
copies it into the turn's :class:`TokenLogprobs`."""


class TokenLogprobs(BaseModel):
    """What the model sampled, as the upstream reported it. Lists are aligned.

    The sampling fields say which distribution ``logprobs`` describe, so that an importance
    ratio can use the behaviour policy's own probabilities. All have defaults: turns
    recorded before they existed still decode (with the kind unknown).
    """

    model_config = ConfigDict(frozen=True)

    token_ids: list[int] = Field(default_factory=list)
    """Sampled token ids (empty when the upstream returns only token strings)."""
    tokens: list[str] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    prompt_token_ids: list[int] = Field(default_factory=list)
    logprobs_kind: Literal["processed", "raw"] | None = None
    """Which distribution ``logprobs`` are of: ``processed``, the one each token was
    actually drawn from (after temperature, top_p, top_k; vLLM's ``processed_logprobs``);
    ``raw``, the model's untempered softmax; None, the upstream did not say."""
    temperature: float | None = None
    """The temperature the tokens were sampled at (0: greedy); None when not recorded."""
    top_p: float | None = None
    """The nucleus mass the tokens were sampled with (1: none); None when not recorded."""
    top_k: int | None = None
    """The top-k cut the tokens were sampled with (0 or -1: none); None when not recorded."""
    seed: int | None = None
    """The sampler's seed, when the request set one."""
    greedy: bool = False
    """True when the answer was decoded greedily (temperature 0, or top_k 1): each token
    had probability 1 under the behaviour policy (its processed logprob is 0), so it
    carries no importance ratio."""


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TurnV1(Message):
    """One request/response exchange, recorded by the gateway after the answer completed."""

    kind: Literal["turn.v1"] = "turn.v1"
    tenant: str
    session_id: str
    turn_index: int = -1
    """Position in the session, assigned in Redis when recorded (-1 before that)."""
    turn_type: Literal["main", "side"] = "main"
    session_done: bool = False
    request_model: str
    upstream_model: str
    policy_version: str | None = None
    messages: list[dict[str, Any]]
    """The messages actually sent upstream (after skill injection)."""
    request_params: dict[str, Any] = Field(default_factory=dict)
    """Sampling parameters and tools of the request (everything but messages)."""
    response_message: dict[str, Any]
    """The assistant message the client received (content, tool_calls, reasoning_content)."""
    finish_reason: str | None = None
    usage: Usage | None = None
    sampled: TokenLogprobs | None = None
    latency_seconds: float = 0.0
    stream: bool = False
    completed: bool = True
    """False when the client went away before the answer ended."""
    skill_ids: list[str] = Field(default_factory=list)
    response_id: str | None = None
    """The completion id the client saw (``chatcmpl-...``); feedback may name it."""
    caller: str = ""
    """Which API key made the turn: ``shared.settings.key_id`` of it (a prefix of its
    SHA-256, not the key). The first turn's caller owns the session: explicit feedback on
    it is taken only from that key or the tenant's admin key."""


class FinalisedV1(Message):
    """A turn whose follow-up is known: ready to be scored (the scorer's internal stream)."""

    kind: Literal["finalised.v1"] = "finalised.v1"
    turn: TurnV1
    follow_up: list[dict[str, Any]] = Field(default_factory=list)
    """What came next: the messages of the next main turn after this turn's answer (the
    user's reply, tool results). Empty when the session ended or went idle."""
    reason: Literal["next_turn", "session_done", "idle", "side_turn"]


class ScoredV1(Message):
    """A turn with its reward, produced once per turn by the scorer."""

    kind: Literal["scored.v1"] = "scored.v1"
    turn: TurnV1
    reward: Annotated[float, Field(allow_inf_nan=False)] | None
    """None means unscored (the judge kept failing): never trained on. A NaN or infinite
    reward fails validation (a dead letter) instead of poisoning a training batch."""
    components: dict[str, float] = Field(default_factory=dict)
    """Each source's reward in [-1, 1] (``judge``, ``implicit``, ``explicit``), and the
    implicit signals that fired (``implicit.correction`` ...)."""
    follow_up: list[dict[str, Any]] = Field(default_factory=list)
    reason: str = "next_turn"
    """Why the turn was finalised: next_turn, session_done, idle, side_turn."""
    judge_tokens: int = 0
    votes: list[int] = Field(default_factory=list)
    rationale: str = ""
    trainable: bool = True
    teacher_hint: str | None = None
    revision: int = Field(0, ge=0)
    """0 for a turn's first score; each superseding entry (explicit feedback that came
    after the turn was scored) has the previous revision + 1 and the id
    ``scored_id(turn.id, revision)``. Consumers keep the newest revision of a turn; a
    revision is not a second turn."""
    previous_reward: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """On a revision, the reward of the revision it supersedes (None on revision 0, or
    when that one was unscored)."""


def scored_id(turn_id: str, revision: int) -> str:
    """The message id of a turn's ``scored.v1`` entry at ``revision``: the turn's id for
    the first score (so a replayed first score is recognised), ``<turn id>:r<n>`` after."""
    return turn_id if revision == 0 else f"{turn_id}:r{revision}"


class FeedbackV1(Message):
    """Explicit feedback was stored (``POST /v1/feedback``): the scorer re-scores the
    already scored turns it names. The feedback itself (score, text) stays in the
    session's feedback hash (``Keys.feedback``), the one place the scorer reads it from;
    the id is the feedback's own (``fb-...``)."""

    kind: Literal["feedback.v1"] = "feedback.v1"
    tenant: str
    session_id: str
    target: str
    """The feedback hash field written: ``turn:<response id>``, ``index:<n>`` or
    ``session`` (every turn of the session)."""
    turn_index: int | None = None
    """The turn named (for ``turn:`` targets, resolved from the response id by the
    gateway); None for the whole session."""


class SkillEventV1(Message):
    """A change in a tenant's skill library; gateways refresh their index on it."""

    kind: Literal["skill.v1"] = "skill.v1"
    tenant: str
    skill_id: str
    action: Literal["created", "updated", "activated", "retired", "deleted"]
    version: int = 1


class WeightsEventV1(Message):
    """A new adapter is ready to serve."""

    kind: Literal["weights.v1"] = "weights.v1"
    tenant: str
    adapter: str
    version: int
    path: str
    """Where the policy server loads it from (a directory or a Tinker URI)."""
    step: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    batch_at: float = 0.0
    """Unix time the trainer took the batch this adapter learned from (0: unknown, e.g. a
    rollback): gateways measure from it how long new weights take to go live."""


MESSAGE_KINDS: dict[str, type[Message]] = {
    m.model_fields["kind"].default: m
    for m in (TurnV1, FinalisedV1, ScoredV1, SkillEventV1, WeightsEventV1, FeedbackV1)
}
"""Every kind a consumer may meet, by name."""


_KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}\.v\d{1,3}")
"""What a message kind looks like (``turn.v1``)."""


class BadMessage(ValueError):
    """A stream entry that is not a valid message; it goes to the dead-letter stream."""


def decode(fields: dict[bytes, bytes]) -> Message:
    """The message in a stream entry, validated; raises ``BadMessage``."""
    kind_raw = fields.get(b"kind")
    data = fields.get(b"data")
    if kind_raw is None or data is None:
        raise BadMessage("entry lacks 'kind' or 'data'")
    kind = kind_raw.decode(errors="replace")
    model = MESSAGE_KINDS.get(kind)
    if model is None:
        # The field may hold anything (a secret too): only a kind-like name is repeated.
        shown = kind if _KIND_NAME.fullmatch(kind) else f"({len(kind)} characters)"
        raise BadMessage(f"unknown message kind {shown!r}")
    try:
        message = model.model_validate_json(data)
    except ValidationError as exc:
        raise BadMessage(f"invalid {kind}: {exc.error_count()} error(s): "
                         f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None
    message._raw = data
    return message
