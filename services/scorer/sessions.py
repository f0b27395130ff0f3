"""Turn finalisation: a turn becomes scoreable once its follow-up is known.

The follow-up of main turn *p* is what the next main turn *n* of the same session brought:
the messages after *p*'s answer (the user's reply, tool results). It is known once every
turn between *p* and *n* has been seen; the turns in between can only be side turns.
Side turns are finalised on arrival; an explicit end of session (``X-Session-Done``) or
an idle timeout finalises what is left without a follow-up.

Session state lives in Redis (a hash per session), so any scorer replica can finish any
session. Everything happens in Lua scripts, so storing a turn, pairing it and appending
the ``finalised.v1`` entry is one atomic step: a redelivered turn changes nothing, two
replicas never finalise a turn twice, and a crash cannot lose a finalisation.

Hash fields, for the turn with index *k*:
- ``<k>``: ``m|<turn id>`` (main, waiting), ``f`` (main, finalised) or ``s`` (side);
- ``t<k>``: the turn's JSON, until it is finalised;
- ``u<k>``: the turn's own opening messages (its follow-up for the previous main turn),
  until that previous turn is finalised.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from shared.keys import FINALISED, Keys
from shared.messages import TurnV1

WALK_LIMIT = 1000
"""How far the pairing walks through a session's turns (a session with more consecutive
side turns than this waits for the idle sweep)."""

_COMMON_LUA = """
local function marker(i) return redis.call('HGET', KEYS[1], tostring(i)) end

local function emit(id, turn_json, follow_up, reason)
  local data = '{"kind":"finalised.v1","id":"' .. id .. '","created_at":' .. ARGV[1] ..
               ',"turn":' .. turn_json .. ',"follow_up":' .. follow_up ..
               ',"reason":"' .. reason .. '"}'
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'finalised.v1', 'data', data)
end

-- Finalise main turn p (if still waiting) with the follow-up of turn n (or none).
local function finalise(p, n, reason)
  local m = marker(p)
  if not m or string.sub(m, 1, 1) ~= 'm' then return 0 end
  local follow_up = '[]'
  if n then follow_up = redis.call('HGET', KEYS[1], 'u' .. n) or '[]' end
  emit(string.sub(m, 3), redis.call('HGET', KEYS[1], 't' .. p), follow_up, reason)
  redis.call('HSET', KEYS[1], tostring(p), 'f')
  redis.call('HDEL', KEYS[1], 't' .. p)
  if n then redis.call('HDEL', KEYS[1], 'u' .. n) end
  return 1
end

-- Nearest main turn from i going by step (-1 or +1) through seen side turns.
local function walk(i, step, limit)
  for _ = 1, limit do
    if i < 0 then return nil end
    local m = marker(i)
    if not m then return nil end
    if string.sub(m, 1, 1) ~= 's' then return i end
    i = i + step
  end
  return nil
end
"""

_ARRIVE_LUA = _COMMON_LUA + """
-- KEYS: session hash, finalised stream, idle zset
-- ARGV: now, maxlen, index, 'main'|'side', turn id, turn json, opening json, done, ttl, limit
local k, kind, done, limit = tonumber(ARGV[3]), ARGV[4], ARGV[8] == '1', tonumber(ARGV[10])
local count = 0
if not marker(k) then
  if kind == 'main' then
    redis.call('HSET', KEYS[1], tostring(k), 'm|' .. ARGV[5], 't' .. k, ARGV[6], 'u' .. k, ARGV[7])
  else
    redis.call('HSET', KEYS[1], tostring(k), 's')
    emit(ARGV[5], ARGV[6], '[]', 'side_turn')
    count = count + 1
  end
end
local before = walk(k - 1, -1, limit)
local after = walk(k + 1, 1, limit)
if kind == 'main' then
  if before then count = count + finalise(before, k, 'next_turn') end
  if after then count = count + finalise(k, after, 'next_turn') end
  if done then count = count + finalise(k, nil, 'session_done') end
else
  if before and after then count = count + finalise(before, after, 'next_turn') end
  if before and done then count = count + finalise(before, nil, 'session_done') end
end
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('ZADD', KEYS[3], ARGV[1], KEYS[1])
return count
"""

_SWEEP_LUA = _COMMON_LUA + """
-- KEYS: session hash, finalised stream, idle zset; ARGV: now, maxlen, cutoff
local last = redis.call('ZSCORE', KEYS[3], KEYS[1])
if not last or tonumber(last) > tonumber(ARGV[3]) then return -1 end
local count = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if string.sub(fields[i + 1], 1, 2) == 'm|' then
    count = count + finalise(tonumber(fields[i]), nil, 'idle')
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], KEYS[1])
return count
"""


def opening_messages(turn: TurnV1) -> list[dict[str, Any]]:
    """What a turn brought after the previous answer: its messages after the last
    assistant message (the user's new message, tool results). That is the previous
    main turn's follow-up."""
    messages = turn.messages
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return messages[i + 1:]
    return [m for m in messages if m.get("role") not in ("system", "developer")][-1:]


class Sessions:
    """Finalises turns; shared by every scorer replica through Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, maxlen: int, idle_seconds: float,
                 ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._idle = idle_seconds
        self._ttl = ttl_seconds
        self._arrive = redis.register_script(_ARRIVE_LUA)
        self._sweep = redis.register_script(_SWEEP_LUA)

    def _session_keys(self, session_key: str) -> list[str]:
        return [session_key, self._keys.stream(FINALISED), self._keys.idle_sessions()]

    async def arrive(self, turn: TurnV1, turn_json: bytes) -> int:
        """Record a turn and append what it finalises; returns how many turns that is."""
        result = await self._arrive(**self._arrive_call(turn, turn_json))
        return int(result)

    async def arrive_many(self, turns: Sequence[TurnV1]) -> list[Exception | None]:
        """``arrive`` for several turns in one pipelined round trip; per turn, None or
        the error Redis answered for it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for turn in turns:
                await self._arrive(**self._arrive_call(turn, turn.json_bytes()), client=pipe)
            results = await pipe.execute(raise_on_error=False)
        return [r if isinstance(r, Exception) else None for r in results]

    def _arrive_call(self, turn: TurnV1, turn_json: bytes) -> dict[str, Any]:
        session_key = self._keys.session_turns(turn.tenant, turn.session_id)
        return {"keys": self._session_keys(session_key),
                "args": [repr(time.time()), self._maxlen, turn.turn_index, turn.turn_type,
                         turn.id, turn_json, orjson.dumps(opening_messages(turn)),
                         "1" if turn.session_done else "0", self._ttl, WALK_LIMIT]}

    async def idle_sessions(self, limit: int = 100) -> Sequence[str]:
        """Sessions with no turn for ``idle_seconds``."""
        cutoff = time.time() - self._idle
        found = await self._redis.zrangebyscore(self._keys.idle_sessions(), "-inf", cutoff,
                                                start=0, num=limit)
        return [k.decode() if isinstance(k, bytes) else k for k in cast(list[Any], found)]

    async def sweep(self, session_key: str) -> int:
        """Finalise an idle session's waiting turns; -1 if it is no longer idle (a turn
        arrived, or another replica swept it)."""
        now = time.time()
        result = await self._sweep(keys=self._session_keys(session_key),
                                   args=[repr(now), self._maxlen, now - self._idle])
        return int(result)
