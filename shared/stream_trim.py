"""Trimming a stream read by consumer groups, and finding the entries a group lost.

Producers cap such a stream only at ``stream_hard_maxlen`` (a safety cap); its stream
workers trim it to about ``stream_maxlen`` (``trim``), never past the oldest entry some
group has not finished: its oldest pending entry, or, with none pending, its last-delivered
id. A group that lags further than that holds the stream above ``stream_maxlen``; it is
reported (``Trim.over_cap``, ``Trim.holder``), not trimmed.

Entries can still go before a group handled them (the hard cap, a hand-made XTRIM).
``trim`` finds those that were never delivered: a group cannot have more unread entries
than the stream holds, so when Redis's count of them (``entries-added`` minus the group's
``entries-read``) exceeds the stream's length, the difference was removed before it was
delivered. It is counted as lost and the group's counter is corrected (``XGROUP SETID ...
ENTRIESREAD``), so each loss counts once and the group's lag reads true again. For the
counter to be right from the start, groups are created with the entries removed before
they existed counted as read (``create_group``).

How exact: while a group has read nothing past a gap, exactly. Entries it read past the
gap before a trim looked defer as many lost ones until they are trimmed in turn; for the
group that lags (the one the hard cap bites) that is about its pending entries. A group
found at the end of the stream gets its counter set to ``entries-added`` (what it must be
there), which drops such a deferred rest. Redis 7.0 neither replicates nor persists the
counter with the reads themselves (XCLAIM carries no count; redis/redis#12898), so each trim
re-states it (``SETID``): after a Redis restart or failover it is at most one trim interval
behind, which can show as that many lost entries for a group that was holding the trim
back, and as lag until the group reaches the end of the stream. Not found: an entry deleted
by hand (XDEL) before a group read it (Redis then stops counting the group's reads; Reef
itself never XDELs). Pending entries that are gone are the worker's to find (it reads them
back empty, or XAUTOCLAIM lists them as deleted).

Needs Redis 7.0 (``ENTRIESREAD``, ``entries-read``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

TRIM_MAX_ENTRIES = 100_000
"""Most entries one trim removes, so a trim let go after a long block holds Redis only
briefly; the next one follows at once."""
TRIM_NODE_ENTRIES = 100
"""Entries per stream node (Redis's ``stream-node-max-entries`` default). Trimming removes
whole nodes, so a trim may leave the stream up to this many entries below ``stream_maxlen``
(and, with a larger node setting, a little above it)."""

_FIELDS_LUA = """
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
"""

CREATE_GROUP_LUA = _FIELDS_LUA + """
local removed = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
  removed = info['entries-added'] - info['length']
end
return redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM',
                   'ENTRIESREAD', removed)
"""
"""KEYS: stream; ARGV: group. The group reads from the start; the entries removed before
it existed count as read (they were never its to lose). Errors (BUSYGROUP) are replies."""

TRIM_LUA = _FIELDS_LUA + """
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
local out = {0, 0, '', 0, {}}
if redis.call('EXISTS', KEYS[1]) == 0 then return out end
local info = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
local length, added = info['length'], info['entries-added']
local removed = added - length
local floor = nil
for _, raw in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = fields(raw)
  local name, last, read = g['name'], g['last-delivered-id'], g['entries-read']
  table.insert(out[5], name)
  if read then
    local counted = read
    if removed > read then
      table.insert(out, name)
      table.insert(out, removed - read)
      counted = removed
    end
    if last == info['last-generated-id'] then counted = added end
    redis.call('XGROUP', 'SETID', KEYS[1], name, last, 'ENTRIESREAD', counted)
  end
  local oldest = redis.call('XPENDING', KEYS[1], name)[2] or last
  if not floor or older(oldest, floor) then floor, out[3] = oldest, name end
end
local cap = tonumber(ARGV[1])
if floor and length > cap then
  local limit = length - cap + tonumber(ARGV[3])
  if limit > tonumber(ARGV[2]) then limit, out[4] = tonumber(ARGV[2]), 1 end
  out[1] = redis.call('XTRIM', KEYS[1], 'MINID', '~', floor, 'LIMIT', limit)
  out[2] = math.max(0, length - out[1] - cap)
end
return out
"""
"""KEYS: stream; ARGV: stream_maxlen, most entries to remove, entries per node. Returns
{removed, over the cap after, the group whose oldest unfinished entry is the oldest, 1 if
stopped by the removal limit, {every group}, group, lost, group, lost ...}."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Trim:
    """What one ``trim`` did and found."""

    trimmed: int
    """Entries removed (every group had finished them)."""
    over_cap: int
    """Entries beyond ``stream_maxlen`` left because ``holder`` has not finished them."""
    holder: str
    """The group whose oldest unfinished entry is the oldest of all groups' ("" if none)."""
    more: bool
    """Stopped at ``TRIM_MAX_ENTRIES``: trim again at once (``over_cap`` is then 0)."""
    groups: list[str]
    """Every group of the stream."""
    lost: dict[str, int]
    """Group -> entries found removed before they were delivered to it (each counted once)."""


async def create_group(redis: Redis, stream_key: str, group: str) -> bool:
    """Create ``group`` (and the stream) reading from the start; False if it existed."""
    script = redis.register_script(CREATE_GROUP_LUA)
    try:
        await script(keys=[stream_key], args=[group])
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


class Trimmer:
    """Trims one stream to about ``maxlen`` past what every group finished (``TRIM_LUA``)."""

    def __init__(self, redis: Redis, stream_key: str, maxlen: int) -> None:
        self.stream_key, self.maxlen = stream_key, maxlen
        self._script = redis.register_script(TRIM_LUA)

    async def trim(self) -> Trim:
        """One trim (and loss check), atomic in Redis."""
        reply: list[Any] = await self._script(
            keys=[self.stream_key], args=[self.maxlen, TRIM_MAX_ENTRIES, TRIM_NODE_ENTRIES])
        more = bool(reply[3])
        pairs = reply[5:]
        return Trim(trimmed=int(reply[0]), over_cap=0 if more else int(reply[1]),
                    holder=_text(reply[2]), more=more,
                    groups=[_text(g) for g in reply[4]],
                    lost={_text(g): int(n) for g, n in zip(pairs[::2], pairs[1::2], strict=True)})
