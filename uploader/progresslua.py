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
# ARGV: now; the successes, "index bytes" pairs space-separated (bytes -1: found present);
# then three per failure: index, label, reason.
# Counts only on a mark going from unset to set (BITFIELD returns the old bits), so a batch
# sent twice, or two runs at once, never count an entry twice. A failure counts once per
# entry and only while the entry is unmarked; an upload takes it back.
# Returns {labels taken back, indexes whose failure is recorded, failed count}.
APPLY = """
local h, marks, failing = KEYS[1], KEYS[2], KEYS[3]
local c = redis.call('HMGET', h, 'uploaded', 'skipped', 'failed', 'bytes')
local up, sk, fl, by = tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0
local idx, size = {}, {}
for i, b in string.gmatch(ARGV[2], '(%d+) (%-?%d+)') do
  idx[#idx + 1] = tonumber(i)
  size[#size + 1] = tonumber(b)
end
local taken, recorded = {}, {}
for first = 1, #idx, 1000 do
  local last = math.min(first + 999, #idx)
  local ops = {}
  for j = first, last do
    ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'u1'; ops[#ops + 1] = idx[j]; ops[#ops + 1] = 1
  end
  local old = redis.call('BITFIELD', marks, unpack(ops))
  for j = first, last do
    if old[j - first + 1] == 0 then
      if size[j] < 0 then sk = sk + 1 else up = up + 1; by = by + size[j] end
      if fl > 0 then
        local was = redis.call('HGET', failing, idx[j])
        if was then
          redis.call('HDEL', failing, idx[j])
          taken[#taken + 1] = string.match(was, '^([^%z]*)')
          fl = fl - 1
        end
      end
    end
  end
end
for i = 3, #ARGV, 3 do
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
for i, want in ipairs({'hash', 'string', 'hash', 'hash'}) do
  local found = redis.call('TYPE', KEYS[i]).ok
  if found ~= 'none' and found ~= want then return {'badkey', KEYS[i], found} end
end
if #KEYS > 4 and redis.call('EXISTS', KEYS[5]) == 1 then
  for i = 5, 7 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i - 3]) end
  end
  redis.call('DEL', KEYS[8])
end
local mode = 'resume'
if redis.call('HEXISTS', h, 'finished_at') == 1 then
  local was = redis.call('HMGET', h, 'beanstalkd', 'beanstalk_job', 'put_at', 'state')
  local put = tonumber(was[3] or '')
  local same = ARGV[4] ~= '' and was[1] == ARGV[4] and was[2] == ARGV[5] and put ~= nil
    and math.abs(put - tonumber(ARGV[6])) <= tonumber(ARGV[8])
  if not same then
    mode = 'fresh'
  elseif was[4] == 'cancelled' then
    return {'cancelled', ''}
  end
end
if mode == 'fresh' then
  redis.call('DEL', h, KEYS[2], KEYS[3])
end
local other, seen = redis.call('HGET', h, 'worker'), tonumber(redis.call('HGET', h, 'updated_at') or '')
local overlap = ''
if mode == 'resume' and redis.call('HGET', h, 'state') == 'running' and other and other ~= ARGV[1]
    and seen and tonumber(ARGV[2]) - seen <= tonumber(ARGV[9]) then
  overlap = other .. ' ' .. (tonumber(ARGV[2]) - seen)
end
redis.call('HSET', h, 'state', 'running', 'worker', ARGV[1], 'updated_at', ARGV[2], 'failed', 0)
if ARGV[3] ~= '' then redis.call('HSET', h, 'total', ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('HSET', h, 'beanstalkd', ARGV[4], 'beanstalk_job', ARGV[5], 'put_at', ARGV[6], 'tube', ARGV[7])
end
for _, name in ipairs({'uploaded', 'skipped', 'bytes'}) do redis.call('HSETNX', h, name, 0) end
redis.call('HSETNX', h, 'started_at', ARGV[2])
redis.call('HDEL', h, 'finished_at')
redis.call('DEL', KEYS[4])
redis.call('PERSIST', h)
redis.call('PERSIST', KEYS[2])
return {mode, overlap}
"""

# KEYS: the job's hash, marks, walk digests, failing entries. ARGV: state, now, ttl, total
# ('' if unknown). Settles the hash and starts every key's expiry clock; returns the hash
# (flat) and the failing entries' "label NUL reason" values, to rebuild the failed hash from.
FINISH = """
local h = KEYS[1]
redis.call('HSET', h, 'state', ARGV[1], 'finished_at', ARGV[2], 'updated_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', h, 'total', ARGV[4]) end
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return {redis.call('HGETALL', h), redis.call('HVALS', KEYS[4])}
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
        return client.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self, client: aioredis.Redis) -> None:
        await client.script_load(self.source)


@dataclass(slots=True)
class Batch:
    """One job's outcomes on their way to Redis, in APPLY's argument shapes."""

    successes: list[str] = field(default_factory=list)  # "index bytes", bytes -1 when present
    failures: list[EncodableT] = field(default_factory=list)  # index, label, reason, ...

    def __len__(self) -> int:
        return len(self.successes) + len(self.failures) // 3

    def args(self, now: int) -> list[EncodableT]:
        return [now, " ".join(self.successes), *self.failures]

    def reasons(self, recorded: Sequence[bytes]) -> dict[str, str]:
        """label -> reason of the failures APPLY recorded."""
        wanted = {int(i) for i in recorded}
        triples = zip(self.failures[0::3], self.failures[1::3], self.failures[2::3], strict=True)
        return {str(label): str(reason) for index, label, reason in triples if index in wanted}


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
                batch.successes.append(f"{index} {settled[k + 1]}")
        for index, (label, reason) in self.failures.items():
            batch.failures += (index, label, reason)
        return batch
