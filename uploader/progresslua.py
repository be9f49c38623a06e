"""The scripts that keep a job's progress exact, and the buffers they are fed from.

Each script touches one job's keys in one hash slot only (the job's hash, its resume marks,
walk digests and failing entries: see `Keys`), so it runs on a Redis Cluster as on a single
server. The failed reasons hash is the producer's name, in a slot of its own: it is written
beside the script, and rebuilt from the failing entries when the job finishes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

# KEYS: the job's hash, marks, failing entries (index -> label NUL reason).
# ARGV: now; the successes as a bitmap from byte ARGV[2] on (ARGV[3]; first = -1: none, or too
# sparse for one), their number, uploaded, skipped and bytes; the successes as "index bytes"
# pairs (bytes -1: found present); then three per failure: index, label, reason.
# Counts only on a mark going from unset to set, so a batch sent twice, or two runs at once,
# never count an entry twice. The common case costs Redis a few commands per batch, not per
# entry: the bitmap is OR-ed in, and when every bit was new (and no failure is pending) the
# batch's totals count; otherwise each entry is decided against the old bits.
# A failure counts once per entry and only while the entry is unmarked; an upload takes it
# back. Returns {labels taken back, indexes whose failure is recorded, failed count}.
APPLY = """
local h, marks, failing = KEYS[1], KEYS[2], KEYS[3]
local c = redis.call('HMGET', h, 'uploaded', 'skipped', 'failed', 'bytes')
local up, sk, fl, by = tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0
local taken, recorded, n, first = {}, {}, tonumber(ARGV[4]), tonumber(ARGV[2])
local function settle(index, size)
  if size < 0 then sk = sk + 1 else up = up + 1; by = by + size end
  if fl > 0 then
    local was = redis.call('HGET', failing, index)
    if was then
      redis.call('HDEL', failing, index)
      taken[#taken + 1] = string.match(was, '^([^%z]*)')
      fl = fl - 1
    end
  end
end
if n > 0 and first >= 0 then
  local add = ARGV[3]
  local last = first + #add - 1
  local old = redis.call('GETRANGE', marks, first, last)
  local merged, new = {}, 0
  for i = 1, #add do
    local a, o = string.byte(add, i), string.byte(old, i) or 0
    local fresh = bit.band(a, bit.bnot(o))
    while fresh ~= 0 do
      fresh = bit.band(fresh, fresh - 1)
      new = new + 1
    end
    merged[i] = string.char(bit.bor(a, o))
  end
  redis.call('SETRANGE', marks, first, table.concat(merged))
  if new == n and fl == 0 then
    up, sk, by = up + tonumber(ARGV[5]), sk + tonumber(ARGV[6]), by + tonumber(ARGV[7])
  else
    local seen = {}
    for i, b in string.gmatch(ARGV[8], '(%d+) (%-?%d+)') do
      local index = tonumber(i)
      local byte = string.byte(old, math.floor(index / 8) - first + 1) or 0
      if not seen[index] and bit.band(byte, bit.rshift(128, index % 8)) == 0 then
        seen[index] = true
        settle(index, tonumber(b))
      end
    end
  end
elseif n > 0 then
  local idx, size = {}, {}
  for i, b in string.gmatch(ARGV[8], '(%d+) (%-?%d+)') do
    idx[#idx + 1] = tonumber(i)
    size[#size + 1] = tonumber(b)
  end
  for from = 1, #idx, 1000 do
    local to = math.min(from + 999, #idx)
    local ops = {}
    for j = from, to do
      ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'u1'; ops[#ops + 1] = idx[j]; ops[#ops + 1] = 1
    end
    local was = redis.call('BITFIELD', marks, unpack(ops))
    for j = from, to do
      if was[j - from + 1] == 0 then settle(idx[j], size[j]) end
    end
  end
end
for i = 9, #ARGV, 3 do
  if redis.call('GETBIT', marks, ARGV[i]) == 0 then
    fl = fl + redis.call('HSET', failing, ARGV[i], ARGV[i + 1] .. '\\0' .. ARGV[i + 2])
    recorded[#recorded + 1] = ARGV[i]
  end
end
redis.call('HSET', h, 'uploaded', up, 'skipped', sk, 'failed', fl, 'bytes', string.format('%.0f', by),
  'updated_at', ARGV[1])
return {taken, recorded, fl}
"""

# KEYS: the job's hash, marks, walk digests, failing entries; off a cluster also the names
# versions before 0.5 used for the last three, then their `applied` hash (see Keys.legacy).
# ARGV: worker, now, total ('' if unknown), beanstalkd address, job id, put time, tube, slack,
# overlap window. Returns {mode, overlap}: mode 'fresh' (a new run of a finished job's ID),
# 'resume', or 'cancelled' (the same delivery of a run that was cancelled: it stays so);
# overlap '' or "worker seconds" when another worker's run wrote progress that recently.
# Or {'badkey', key, type} when a key holds something else (a producer's mistake).
START = """
local h = KEYS[1]
for i, want in ipairs({'hash', 'string'}) do
  local found = redis.call('TYPE', KEYS[i]).ok
  if found ~= 'none' and found ~= want then return {'badkey', KEYS[i], found} end
end
if #KEYS > 4 and redis.call('EXISTS', KEYS[5]) == 1 then
  for i = 5, 7 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i - 3]) end
  end
  redis.call('DEL', KEYS[8])
end
local was = redis.call('HMGET', h, 'finished_at', 'beanstalkd', 'beanstalk_job', 'put_at', 'state', 'worker',
  'updated_at', 'started_at', 'uploaded')
local mode, finished = 'resume', was[1]
if finished then
  local put = tonumber(was[4] or '')
  local same = ARGV[4] ~= '' and was[2] == ARGV[4] and was[3] == ARGV[5] and put ~= nil
    and math.abs(put - tonumber(ARGV[6])) <= tonumber(ARGV[8])
  if not same then
    mode = 'fresh'
    redis.call('DEL', h, KEYS[2], KEYS[3])
  elseif was[5] == 'cancelled' then
    return {'cancelled', ''}
  end
  redis.call('HDEL', h, 'finished_at')
  redis.call('PERSIST', h)
  redis.call('PERSIST', KEYS[2])
end
local other, seen = was[6], tonumber(was[7] or '')
local overlap = ''
if mode == 'resume' and was[5] == 'running' and other and other ~= ARGV[1]
    and seen and tonumber(ARGV[2]) - seen <= tonumber(ARGV[9]) then
  overlap = other .. ' ' .. (tonumber(ARGV[2]) - seen)
end
local fields = {'state', 'running', 'worker', ARGV[1], 'updated_at', ARGV[2], 'failed', 0}
if ARGV[3] ~= '' then fields[#fields + 1] = 'total'; fields[#fields + 1] = ARGV[3] end
if ARGV[4] ~= '' then
  for i, name in ipairs({'beanstalkd', 'beanstalk_job', 'put_at', 'tube'}) do
    fields[#fields + 1] = name; fields[#fields + 1] = ARGV[3 + i]
  end
end
if mode == 'fresh' or not was[8] then fields[#fields + 1] = 'started_at'; fields[#fields + 1] = ARGV[2] end
if mode == 'fresh' or not was[9] then
  for _, name in ipairs({'uploaded', 'skipped', 'bytes'}) do
    fields[#fields + 1] = name; fields[#fields + 1] = 0
  end
end
redis.call('HSET', h, unpack(fields))
redis.call('DEL', KEYS[4])
return {mode, overlap}
"""

# KEYS: the job's hash, marks, walk digests, failing entries. ARGV: state, now, ttl, total
# ('' if unknown). Settles the hash and starts every key's expiry clock; returns the hash
# (flat) and the failing entries' "label NUL reason" values, to rebuild the failed hash from.
FINISH = """
local h = KEYS[1]
if ARGV[4] ~= '' then
  redis.call('HSET', h, 'state', ARGV[1], 'finished_at', ARGV[2], 'updated_at', ARGV[2], 'total', ARGV[4])
else
  redis.call('HSET', h, 'state', ARGV[1], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
local stored, failing = redis.call('HGETALL', h), {}
if redis.call('EXPIRE', KEYS[4], ARGV[3]) == 1 then failing = redis.call('HVALS', KEYS[4]) end
return {stored, failing}
"""

# KEYS: the failed reasons hash. ARGV: ttl, then label, reason pairs: the hash becomes exactly
# these, at once (no reader sees it empty in between), expiring with the rest.
REASONS = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 1999, #ARGV)))
end
if #ARGV > 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
"""


class Lua:
    """A script called by its SHA: no SCRIPT EXISTS round trip per call; a server that lost
    it (a restart, a failover, a new cluster node) answers NOSCRIPT and gets it loaded."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(
        self, client: aioredis.Redis | Pipeline, keys: Sequence[str], args: Sequence[EncodableT]
    ) -> Any:
        # Through execute_command: redis-py's cluster pipeline blocks its `evalsha` method, not
        # the command, which it routes by the keys like any other.
        return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, client: aioredis.Redis) -> None:
        await client.script_load(self.source)


@dataclass(slots=True)
class Batch:
    """One job's outcomes on their way to Redis, in APPLY's argument shapes."""

    indexes: list[int] = field(default_factory=list)  # the successes
    sizes: list[int] = field(default_factory=list)  # their bytes, -1 when found present
    failures: list[EncodableT] = field(default_factory=list)  # index, label, reason, ...

    def __len__(self) -> int:
        return len(self.indexes) + len(self.failures) // 3

    def success(self, index: int, size: int) -> None:
        self.indexes.append(index)
        self.sizes.append(size)

    def args(self, now: int) -> list[EncodableT]:
        indexes, sizes = self.indexes, self.sizes
        first, bitmap = _bitmap(indexes)
        uploaded = [s for s in sizes if s >= 0]
        pairs = " ".join(f"{i} {s}" for i, s in zip(indexes, sizes, strict=True))
        return [now, first, bitmap, len(indexes), len(uploaded), len(sizes) - len(uploaded), sum(uploaded),
                pairs, *self.failures]

    def reasons(self, recorded: Sequence[bytes]) -> dict[str, str]:
        """label -> reason of the failures APPLY recorded."""
        wanted = {int(i) for i in recorded}
        triples = zip(self.failures[0::3], self.failures[1::3], self.failures[2::3], strict=True)
        return {str(label): str(reason) for index, label, reason in triples if index in wanted}


def _bitmap(indexes: list[int]) -> tuple[int, bytes]:
    """The first byte and the bitmap of these entries, or (-1, b"") when it would be sparse:
    more than 64 bytes and over two bytes per entry (APPLY then sets bit by bit)."""
    if not indexes:
        return -1, b""
    first, last = min(indexes) >> 3, max(indexes) >> 3
    if last - first >= max(64, 2 * len(indexes)):
        return -1, b""
    bitmap = bytearray(last - first + 1)
    for index in indexes:
        bitmap[(index >> 3) - first] |= 0x80 >> (index & 7)
    return first, bytes(bitmap)


class Ledger:
    """What this run settled, kept until its final write. Redis acknowledges a write before
    its replica has it, so a failover can lose outcomes: the final write sends again those
    whose marks are missing, and they count then. 16 bytes per settled entry."""

    __slots__ = ("failures", "settled")

    def __init__(self) -> None:
        self.settled = array("q")  # index, bytes (-1: found present), index, bytes, ...
        self.failures: dict[int, tuple[str, str]] = {}

    def success(self, index: int, nbytes: int) -> None:
        self.settled.extend((index, nbytes))

    def missing(self, bitmap: bytes) -> Batch:
        """The outcomes Redis does not show: unmarked successes, and every failure (APPLY
        records a failure only while its entry is unmarked, so sending it again is safe)."""
        batch = Batch()
        settled = self.settled
        for k in range(0, len(settled), 2):
            index = settled[k]
            byte = index >> 3
            if byte >= len(bitmap) or not bitmap[byte] & (0x80 >> (index & 7)):
                batch.success(index, settled[k + 1])
        for index, (label, reason) in self.failures.items():
            batch.failures += (index, label, reason)
        return batch


APPLY_SCRIPT, START_SCRIPT, FINISH_SCRIPT, REASONS_SCRIPT = Lua(APPLY), Lua(START), Lua(FINISH), Lua(REASONS)
SCRIPTS = (APPLY_SCRIPT, START_SCRIPT, FINISH_SCRIPT, REASONS_SCRIPT)
