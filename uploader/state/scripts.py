"""The scripts that keep a job's progress exact, and the buffers they are fed from.

Each script touches one job's keys in one hash slot only (the job's hash, its resume marks,
walk digests and failing entries: see `Keys`), so it runs on a Redis Cluster as on a single
server. The failed reasons hash is the producer's name, in a slot of its own: it is written
beside the script, and rebuilt from the failing entries when the job finishes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

# Shared by APPLY and CLOSE: `apply(c, marks, failing, o, fresh, ttl)` decides one batch of
# outcomes against the resume marks and updates the counters in `c` (up, sk, fl, by).
# The batch is ARGV[o + 1] on: now; the successes as a bitmap from byte ARGV[o + 2] on
# (ARGV[o + 3]; first = -1: none, or too sparse for one), their number, uploaded, skipped and
# bytes; the successes as "index bytes" pairs (bytes -1: found present); then three per
# failure: index, label, reason.
# Counts only on a mark going from unset to set, so a batch sent twice, or two runs at once,
# never count an entry twice. The common case costs Redis a few commands per batch, not per
# entry: the bitmap is OR-ed in, and when every bit was new (and no failure is pending) the
# batch's totals count; otherwise each entry is decided against the old bits. `fresh` (a
# run's first write for a job that had no keys at all) SETs the bitmap with NX (and EX `ttl`)
# in one command, and merges as usual if the key is there after all.
# A failure counts once per entry and only while the entry is unmarked; an upload takes it
# back. Returns the labels taken back, the indexes whose failure is recorded, and whether the
# marks got `ttl`.
APPLY_FN = """
local function apply(c, marks, failing, o, fresh, ttl)
  local taken, recorded, expired = {}, {}, false
  local n, first = tonumber(ARGV[o + 4]), tonumber(ARGV[o + 2])
  local function settle(index, size)
    if size < 0 then c.sk = c.sk + 1 else c.up = c.up + 1; c.by = c.by + size end
    if c.fl > 0 then
      local was = redis.call('HGET', failing, index)
      if was then
        redis.call('HDEL', failing, index)
        taken[#taken + 1] = string.match(was, '^([^%z]*)')
        c.fl = c.fl - 1
      end
    end
  end
  local function totals()
    c.up, c.sk = c.up + tonumber(ARGV[o + 5]), c.sk + tonumber(ARGV[o + 6])
    c.by = c.by + tonumber(ARGV[o + 7])
  end
  if n > 0 and first >= 0 and fresh then
    local bits = string.rep(string.char(0), first) .. ARGV[o + 3]
    local set
    if ttl then
      set = redis.call('SET', marks, bits, 'NX', 'EX', ttl)
    else
      set = redis.call('SET', marks, bits, 'NX')
    end
    if set then
      totals()
      n, expired = 0, ttl ~= nil
    end
  end
  if n > 0 and first >= 0 then
    local add = ARGV[o + 3]
    local old = redis.call('GETRANGE', marks, first, first + #add - 1)
    local merged, new = {}, 0
    for i = 1, #add do
      local a, b = string.byte(add, i), string.byte(old, i) or 0
      local fresh_bits = bit.band(a, bit.bnot(b))
      while fresh_bits ~= 0 do
        fresh_bits = bit.band(fresh_bits, fresh_bits - 1)
        new = new + 1
      end
      merged[i] = string.char(bit.bor(a, b))
    end
    redis.call('SETRANGE', marks, first, table.concat(merged))
    if new == n and c.fl == 0 then
      totals()
    else
      local seen = {}
      for i, b in string.gmatch(ARGV[o + 8], '(%d+) (%-?%d+)') do
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
    for i, b in string.gmatch(ARGV[o + 8], '(%d+) (%-?%d+)') do
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
  for i = o + 9, #ARGV, 3 do
    if redis.call('GETBIT', marks, ARGV[i]) == 0 then
      c.fl = c.fl + redis.call('HSET', failing, ARGV[i], ARGV[i + 1] .. '\\0' .. ARGV[i + 2])
      recorded[#recorded + 1] = ARGV[i]
    end
  end
  return taken, recorded, expired
end

-- The job's counters, and its state (nil: no run has written the hash yet).
local function counters(h)
  local v = redis.call('HMGET', h, 'uploaded', 'skipped', 'failed', 'bytes', 'state', 'total')
  return {up = tonumber(v[1]) or 0, sk = tonumber(v[2]) or 0, fl = tonumber(v[3]) or 0,
          by = tonumber(v[4]) or 0}, v[5], v[6]
end

-- The hash fields of a run started lazily (ARGV[1..6]: worker, total, beanstalkd address, job,
-- put time, tube): what START writes, for a job that had no keys when the run began.
local function started(fields, now)
  local more = {'state', 'running', 'worker', ARGV[1], 'started_at', now}
  if ARGV[2] ~= '' then more[#more + 1] = 'total'; more[#more + 1] = ARGV[2] end
  if ARGV[3] ~= '' then
    for i, name in ipairs({'beanstalkd', 'beanstalk_job', 'put_at', 'tube'}) do
      more[#more + 1] = name; more[#more + 1] = ARGV[2 + i]
    end
  end
  for _, x in ipairs(more) do fields[#fields + 1] = x end
end

local function counted(c, now)
  return {'uploaded', c.up, 'skipped', c.sk, 'failed', c.fl, 'bytes', string.format('%.0f', c.by),
          'updated_at', now}
end
"""

# KEYS: the job's hash, marks, failing entries (index -> label NUL reason).
# ARGV[1..6]: a lazy start (see `started`; worker '' when the run was started by START), then
# the batch from ARGV[7] on (see APPLY_FN). A lazy start finds the hash written by another run
# meanwhile: nothing is applied, and {{}, {}, -1} asks for a START first.
# Returns {labels taken back, indexes whose failure is recorded, failed count}.
APPLY = APPLY_FN + """
local h, marks, failing = KEYS[1], KEYS[2], KEYS[3]
local c, state = counters(h)
local lazy = ARGV[1] ~= ''
if lazy and state then return {{}, {}, -1} end
local taken, recorded = apply(c, marks, failing, 6, lazy, nil)
local fields = counted(c, ARGV[7])
if lazy then started(fields, ARGV[7]) end
redis.call('HSET', h, unpack(fields))
return {taken, recorded, c.fl}
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

# A job's last write in one call, for a run whose whole ledger fits in it (see closing.py):
# its last outcomes (the ledger sent again: what a failover lost counts now, the rest counts
# nothing twice), a lazy start, the verdict, the expiry clocks, the completion message and,
# off a cluster, the cancel flag, the lists of finished and failed jobs and the files list's
# opt-in expiry, and the message published.
# KEYS: the job's hash, marks, walk digests, failing entries; off a cluster also the cancel
# flag, the finished and failed jobs' sorted sets, and (with files_ttl) the files list.
# ARGV[1..6]: a lazy start as in APPLY; 7: 'cancelled' or ''; 8: ttl; 9: total ('' unknown);
# 10: seconds; 11: the events channel ('' to leave the publish to the caller); 12: '1' when
# the run walked directories; 13: the job ID; 14, 15: '1' to trim the finished, failed sets;
# 16, 17: how many they keep; 18: files_ttl (''); 19, 20: the first byte and the bitmap of
# the run's acknowledged successes (-1: none); the batch (what was not acknowledged) from
# ARGV[21] on.
# Returns {-1} when a lazy start finds another run's hash (START first, then again), {-2}
# when the marks lack an acknowledged success (a failover lost it: the long way writes the
# ledger again), else {message, published, failing entries' values, failed count}. A failed
# verdict is never published here: its reasons are rebuilt first.
CLOSE = APPLY_FN + """
local h, ttl = KEYS[1], tonumber(ARGV[8])
local c, state, total = counters(h)
local lazy = ARGV[1] ~= ''
if lazy and state then return {-1} end
if tonumber(ARGV[19]) >= 0 then
  local want = ARGV[20]
  local have = redis.call('GETRANGE', KEYS[2], ARGV[19], tonumber(ARGV[19]) + #want - 1)
  for i = 1, #want do
    local w = string.byte(want, i)
    if bit.band(w, string.byte(have, i) or 0) ~= w then return {-2} end
  end
end
local now = ARGV[21]
local taken, recorded, expired = apply(c, KEYS[2], KEYS[4], 20, lazy, ttl)
local verdict = 'done'
if ARGV[7] ~= '' then verdict = 'cancelled' elseif c.fl > 0 then verdict = 'failed' end
local fields = counted(c, now)
if lazy then started(fields, now) end  -- first: the verdict's fields below win
for _, x in ipairs({'state', verdict, 'finished_at', now}) do fields[#fields + 1] = x end
if ARGV[9] ~= '' then
  total = ARGV[9]
  fields[#fields + 1] = 'total'; fields[#fields + 1] = total
end
redis.call('HSET', h, unpack(fields))
redis.call('EXPIRE', h, ttl)
if not expired then redis.call('EXPIRE', KEYS[2], ttl) end
if ARGV[12] ~= '' then redis.call('EXPIRE', KEYS[3], ttl) end
local failing = {}
if c.fl > 0 and redis.call('EXPIRE', KEYS[4], ttl) == 1 then failing = redis.call('HVALS', KEYS[4]) end
if #KEYS > 4 then
  redis.call('DEL', KEYS[5])
  local lists = {{KEYS[6], ARGV[14], ARGV[16]}}
  if verdict == 'failed' then
    lists[2] = {KEYS[7], ARGV[15], ARGV[17]}
  elseif state then
    redis.call('ZREM', KEYS[7], ARGV[13])
  end
  for _, l in ipairs(lists) do
    redis.call('ZADD', l[1], now, ARGV[13])
    if l[2] ~= '' then
      redis.call('ZREMRANGEBYRANK', l[1], 0, -tonumber(l[3]) - 1)
      redis.call('ZREMRANGEBYSCORE', l[1], '-inf', tonumber(now) - ttl)
      redis.call('EXPIRE', l[1], ttl)
    end
  end
  if ARGV[18] ~= '' then redis.call('EXPIRE', KEYS[8], ARGV[18]) end
end
local message = '{"id":' .. cjson.encode(ARGV[13]) .. ',"state":"' .. verdict .. '","total":' .. (total or 0)
  .. ',"uploaded":' .. c.up .. ',"skipped":' .. c.sk .. ',"failed":' .. c.fl
  .. ',"bytes":' .. string.format('%.0f', c.by) .. ',"seconds":' .. ARGV[10] .. '}'
local published = 0
if ARGV[11] ~= '' and verdict ~= 'failed' then
  redis.call('PUBLISH', ARGV[11], message)
  published = 1
end
return {message, published, failing, c.fl}
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


APPLY_SCRIPT, START_SCRIPT, FINISH_SCRIPT, REASONS_SCRIPT = Lua(APPLY), Lua(START), Lua(FINISH), Lua(REASONS)
CLOSE_SCRIPT = Lua(CLOSE)
SCRIPTS = (APPLY_SCRIPT, START_SCRIPT, FINISH_SCRIPT, REASONS_SCRIPT, CLOSE_SCRIPT)


async def call_script(
    client: aioredis.Redis, script: Lua, keys: Sequence[str], args: Sequence[EncodableT]
) -> Any:
    """One script call, without a pipeline's machinery; on NOSCRIPT load the scripts and call
    it again."""
    try:
        return await script(client, keys, args)
    except redis.exceptions.NoScriptError:
        for each in {*SCRIPTS, script}:
            await each.load(client)
        return await script(client, keys, args)


async def scripted(client: aioredis.Redis, queue: Callable[[Pipeline], object]) -> list[Any]:
    """Run a pipeline of script calls; on NOSCRIPT load the scripts and run it again."""
    for attempt in (1, 2):
        try:
            async with client.pipeline(transaction=False) as pipe:
                queue(pipe)
                replies: list[Any] = await pipe.execute()
                return replies
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for script in SCRIPTS:
                await script.load(client)
    raise AssertionError("unreachable")
