"""Every multi-step Redis operation that must be atomic, as a Lua script (one place, like the names).

Scripts are called by their SHA1 (``EVALSHA``); a Redis that does not know one yet (just started,
or restarted empty) answers ``NOSCRIPT`` and the caller loads it and sends the call again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class Lua:
    """One script and its SHA1, so a call can name it without sending its text."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())

    def call(self, keys: list[str] | tuple[str, ...], args: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
        """The ``EVALSHA`` command that runs this script (for a pipeline or the worker's outbox)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


def is_noscript(reply: object) -> bool:
    """Whether a command's reply says Redis does not have the script (so it did not run)."""
    return isinstance(reply, NoScriptError)


# Reset the idle time of the entries a consumer still owns, and only those: a plain XCLAIM would
# silently take back an entry that another worker has already reclaimed. Returns the ids that the
# consumer no longer owns (the caller's job was taken over and must stop).
REFRESH_CLAIMS = Lua("""
local lost = {}
for i, id in ipairs(ARGV) do
  if i > 1 then
    local p = redis.call('XPENDING', KEYS[1], KEYS[2], id, id, 1)
    if p[1] and p[1][2] == ARGV[1] then
      redis.call('XCLAIM', KEYS[1], KEYS[2], ARGV[1], 0, id, 'JUSTID')
    else
      table.insert(lost, id)
    end
  end
end
return lost
""")


# Admission of one request for one tenant, atomically across every gateway: sliding 60 s windows
# of requests and of reserved tokens, a cap on unfinished requests, and a cap on the tenant's
# backlog (its job stream's length). Time comes from Redis, not from any gateway's clock.
# A request of several jobs (a text completion's prompts) is admitted once: one request, one
# concurrency slot, the tokens of all its jobs, and room in the backlog for every job.
# KEYS: req window, token window, token amounts, token sum, in-flight set, job stream
# ARGV: request id, tokens, rpm, tpm, max concurrent, max backlog, window ms, in-flight ttl ms
# (0 = no limit), and optionally the request's jobs (1 when absent). Returns {1, requests used,
# tokens used, req reset ms, tok reset ms} when admitted, {0, reason, retry after ms, requests
# used, tokens used} when not.
# The first part (the windows brought up to date) is shared with the check before encoding below.
_WINDOWS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, tokens = ARGV[1], tonumber(ARGV[2])
local rpm, tpm, maxc, maxb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local window, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local jobs = tonumber(ARGV[9] or '1')
local since = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', since)
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', since)) do
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], old) or '0'))
  redis.call('HDEL', KEYS[3], old)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', since)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local nreq = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
local function oldest(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) + window - now end
  return 0
end
if rpm > 0 and nreq >= rpm then return {0, 'requests', oldest(KEYS[1]), nreq, used} end
"""

_ADMIT_CHECKS = (
    _WINDOWS
    + """
if tpm > 0 and used + tokens > tpm then
  if tokens > tpm then return {0, 'tokens_too_many', 0, nreq, used} end
  local free, wait = tpm - used, window
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    free = free + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
    if free >= tokens then wait = tonumber(entries[i + 1]) + window - now break end
  end
  return {0, 'tokens', wait, nreq, used}
end
if maxc > 0 and redis.call('ZCARD', KEYS[5]) >= maxc then return {0, 'concurrency', 1000, nreq, used} end
if maxb > 0 and redis.call('XLEN', KEYS[6]) + jobs > maxb then return {0, 'backlog', 0, nreq, used} end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZADD', KEYS[2], now, id)
redis.call('HSET', KEYS[3], id, tokens)
redis.call('INCRBY', KEYS[4], tokens)
redis.call('ZADD', KEYS[5], now + ttl, id)
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], window + ttl) end
"""
)
_ADMITTED = """
return {1, nreq + 1, used + tokens, oldest(KEYS[1]), oldest(KEYS[2])}
"""
_ADMIT = _ADMIT_CHECKS + _ADMITTED

# Admission and, when it admits, the job enqueued, in one round trip: as above, and then the job
# added to its stream (KEYS[6]), the stream recorded in its model's index (KEYS[7]) and who may take
# up the job's replies (KEYS[8]). ARGV as for admission (jobs: 1), then the job stream's field, the
# job, the stream's index record, the owner record and its seconds to live. Returns as admission.
_ADMIT_ENQUEUE = (
    _ADMIT_CHECKS
    + """
redis.call('XADD', KEYS[6], '*', ARGV[10], ARGV[11])
redis.call('HSET', KEYS[7], KEYS[6], ARGV[12])
redis.call('SET', KEYS[8], ARGV[13], 'EX', ARGV[14])
"""
    + _ADMITTED
)

# The same limits, checked before a request is encoded (its token count unknown, so only a minute's
# tokens used up entirely counts), booking nothing: a tenant over its limit costs no encoding.
# KEYS and ARGV as for admission (tokens: 0). Returns {1} when the request may go on, else as
# admission's refusal.
_PRECHECK = (
    _WINDOWS
    + """
if tpm > 0 and used >= tpm then
  local entries = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local wait = window
  if entries[2] then wait = tonumber(entries[2]) + window - now end
  return {0, 'tokens', wait, nreq, used}
end
if maxc > 0 and redis.call('ZCARD', KEYS[5]) >= maxc then return {0, 'concurrency', 1000, nreq, used} end
if maxb > 0 and redis.call('XLEN', KEYS[6]) >= maxb then return {0, 'backlog', 0, nreq, used} end
return {1}
"""
)

# The end of an admitted request: free its concurrency slot and give back the reserved tokens it did
# not use (if its reservation is still inside the window).
# KEYS: token amounts, token sum, in-flight set. ARGV: request id, tokens actually used.
_RELEASE = """
redis.call('ZREM', KEYS[3], ARGV[1])
local reserved = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
local used = tonumber(ARGV[2])
if reserved > used then
  redis.call('HSET', KEYS[1], ARGV[1], used)
  redis.call('DECRBY', KEYS[2], reserved - used)
  return reserved - used
end
return 0
"""


# Every write a worker makes for a job goes through one of the scripts below, which first check that
# the worker still owns the job's stream entry. A worker that stalled past the reclaim idle time and
# lost the job to another is thereby fenced off: none of its late replies reach the client next to
# the new owner's, and the zero it gets back tells it to stop.
_OWNS = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
"""

# Publish replies, keeping each token message in the job's progress list (so the progress a
# successor resumes from is exactly what the client was sent); with 'ack', then end the job: XACK,
# XDEL (XLEN stays the live backlog), drop the progress, count it as drained. For one job or several
# (a worker's outbox merges the calls it sends together, see merge_publishes), each checked on its own.
# KEYS: per job, its stream, progress list and drained counter.
# ARGV: group, consumer, progress ttl ms while a job runs, progress ttl ms once it ended; then per
# job: its entry id, its channel, flags ('a': end the job; 'r': start its progress list over), how
# many messages, and the messages as pairs of (payload, '1' to keep it in the progress list or '').
# Returns per job, in order: 0 when the worker does not own the job, 2 when nobody listens on the
# channel any more (the gateway that took the request is gone: the job is of no use), 1 else, or
# the error a command of that job met.
CLAIMED_PUBLISH = Lua("""
local function publish(j, entry, channel, flags, first, last)
  local p = redis.call('XPENDING', KEYS[j], ARGV[1], entry, entry, 1)
  if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
  if string.find(flags, 'r', 1, true) then redis.call('DEL', KEYS[j + 1]) end
  local result, kept = 1, false
  for i = first, last, 2 do
    if ARGV[i + 1] ~= '' then
      redis.call('RPUSH', KEYS[j + 1], ARGV[i])
      kept = true
    end
    if redis.call('PUBLISH', channel, ARGV[i]) == 0 then result = 2 end
  end
  if string.find(flags, 'a', 1, true) then
    redis.call('XACK', KEYS[j], ARGV[1], entry)
    redis.call('XDEL', KEYS[j], entry)
    redis.call('PEXPIRE', KEYS[j + 1], ARGV[4])
    redis.call('INCR', KEYS[j + 2])
    return 1
  end
  if kept then redis.call('PEXPIRE', KEYS[j + 1], ARGV[3]) end
  return result
end

local results = {}
local a = 5
for j = 1, #KEYS, 3 do
  local first, last = a + 4, a + 3 + 2 * tonumber(ARGV[a + 3])
  -- A job whose command fails (a key of the wrong type, a full Redis) gets that error as its own
  -- result; the jobs around it go on as if each had been called alone.
  local ok, result = pcall(publish, j, ARGV[a], ARGV[a + 1], ARGV[a + 2], first, last)
  if ok then
    results[#results + 1] = result
  else
    results[#results + 1] = redis.error_reply(type(result) == 'table' and result.err or tostring(result))
  end
  a = last + 1
end
return results
""")

_PUBLISH_KEYS = 3
_PUBLISH_SHARED = slice(3 + _PUBLISH_KEYS, 3 + _PUBLISH_KEYS + 4)
"""Where a one-job call of CLAIMED_PUBLISH holds the arguments every job of a worker shares."""


def claimed_publish(
    keys: tuple[str, str, str],
    shared: tuple[str, str, int, int],
    entry_id: str,
    channel: str,
    flags: str,
    pairs: list[str | bytes],
) -> tuple[Any, ...]:
    """The call of CLAIMED_PUBLISH for one job: ``keys`` its stream, progress list and drained
    counter; ``shared`` the group, consumer and the two progress TTLs; ``pairs`` its messages."""
    return CLAIMED_PUBLISH.call(keys, (*shared, entry_id, channel, flags, len(pairs) // 2, *pairs))


def is_claimed_publish(command: tuple[Any, ...]) -> bool:
    return len(command) > 2 and command[0] == "EVALSHA" and command[1] == CLAIMED_PUBLISH.sha


def mergeable_publishes(first: tuple[Any, ...], other: tuple[Any, ...]) -> bool:
    """Whether two one-job calls of CLAIMED_PUBLISH (see :func:`claimed_publish`) can go as one."""
    return first[_PUBLISH_SHARED] == other[_PUBLISH_SHARED]


def merge_publishes(calls: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """One call of CLAIMED_PUBLISH doing what one-job ``calls`` that share their group, consumer
    and TTLs do, in their order; its reply lists each call's result in that order."""
    keys = [key for call in calls for key in call[3 : 3 + _PUBLISH_KEYS]]
    jobs = [arg for call in calls for arg in call[_PUBLISH_SHARED.stop :]]
    return CLAIMED_PUBLISH.call(keys, (*calls[0][_PUBLISH_SHARED], *jobs))


# Re-queue a job this worker will not finish, as a new entry marked handed back; its progress stays
# for the next worker. KEYS: job stream. ARGV: group, consumer, entry id, job field, job,
# handed-back field.
CLAIMED_HAND_BACK = Lua(
    _OWNS
    + """
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[5], ARGV[6], '1')
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

# Hand a job to another worker (prefix affinity) only while that worker holds fewer than a given
# number of jobs, counted exactly and atomically (its pending entries in every job stream of the
# model), so givers that all see it with room at once cannot overfill it; then tell it on its inbox,
# and when nobody hears that, give the entry back to the giver. KEYS: the entry's stream, then every
# job stream of the model. ARGV: group, taker, giver, entry id, the most jobs the taker may hold
# already, its inbox channel, the message. Returns 1 handed, 0 the taker is too busy (nothing
# changed), 2 nobody listened.
HAND_OVER = Lua("""
local held = 0
for i = 2, #KEYS do
  local summary = redis.pcall('XPENDING', KEYS[i], ARGV[1])
  if type(summary) == 'table' and summary.err == nil and summary[4] then
    for _, consumer in ipairs(summary[4]) do
      if consumer[1] == ARGV[2] then held = held + tonumber(consumer[2]) end
    end
  end
end
if held >= tonumber(ARGV[5]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'JUSTID')
if redis.call('PUBLISH', ARGV[6], ARGV[7]) > 0 then return 1 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[4], 'JUSTID')
return 2
""")

WORKER_SCRIPTS = (CLAIMED_PUBLISH, CLAIMED_HAND_BACK, HAND_OVER)
"""The scripts a worker's outbox calls: loaded again whenever Redis answers NOSCRIPT."""


class Scripts:
    """The gateway's admission scripts; redis-py loads them on ``NOSCRIPT`` by itself."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.admit: AsyncScript = redis.register_script(_ADMIT)
        self.admit_enqueue: AsyncScript = redis.register_script(_ADMIT_ENQUEUE)
        self.precheck: AsyncScript = redis.register_script(_PRECHECK)
        self.release: AsyncScript = redis.register_script(_RELEASE)

    async def load(self) -> None:
        for script in (_ADMIT, _ADMIT_ENQUEUE, _PRECHECK, _RELEASE):
            await self._redis.script_load(script)


# -- the Batch API ---------------------------------------------------------------------------------

# Move a batch's status if it is one of the allowed sources, stamping ``<status>_at`` and setting
# any further fields in the same step, so a cancel from a gateway and a move by the process
# running the batch can never overwrite each other. KEYS: batch hash. ARGV: target status, now,
# number of sources n, the n sources, then (field, value) pairs. Returns {1 if moved, status before}.
_BATCH_MOVE = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  if ARGV[i] == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    for j = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
    return {1, current}
  end
end
return {0, current}
"""

# Take or keep the lease on a batch: one process feeds it at a time, and one that stops renewing
# (killed, stalled) loses it after the expiry. KEYS: lease. ARGV: token, ms. Returns 1 if held.
_LEASE_KEEP = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The lease fences every write about a batch's lines: a process that lost it (stalled past the
# expiry while another took over) can neither put a line on a queue nor record a result.
_LEASED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
"""

# Give a line to a new job, if it has no result and its current job is the expected one (none: '').
# KEYS: lease, results, jobs. ARGV: token, custom_id, job id, expected job id.
# Returns 1 when assigned, 0 when not (finished, or assigned meanwhile), -1 without the lease.
_LINE_ASSIGN = (
    _LEASED
    + """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
local current = redis.call('HGET', KEYS[3], ARGV[2]) or ''
if current ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 1
"""
)

# Record a line's result once: only from the job the line is assigned to now, and only if it has
# none yet, counting it in the batch and in the totals. KEYS: lease, results, jobs, batch, stats.
# ARGV: token, custom_id, job id, result line, outcome (completed|failed), prompt, completion tokens.
# Returns 1 when recorded, 0 when refused, -1 without the lease.
_LINE_RESULT = (
    _LEASED
    + """
if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[4]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
redis.call('HINCRBY', KEYS[4], 'prompt_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'completion_tokens', ARGV[7])
redis.call('HINCRBY', KEYS[5], ARGV[5], 1)
return 1
"""
)


# -- file storage quotas ---------------------------------------------------------------------------
#
# Two counters bound stored files: all bytes, and each tenant's. Both count stored files and the
# room uploads under way have reserved (from their Content-Length, before reading the body), and
# both move only in these scripts, in the same step as the records they count.

# Reserve room for an upload. KEYS: total counter, tenant counter, reservations, reservation expiry.
# ARGV: reservation id, bytes, total bound, tenant bound (0: none), lapses at (s).
# Returns {1} when reserved, {0, 'store' or 'tenant', bytes used there} when there is no room.
_FILE_RESERVE = """
local size = tonumber(ARGV[2])
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local mine = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[4]) > 0 and mine + size > tonumber(ARGV[4]) then return {0, 'tenant', mine} end
if total + size > tonumber(ARGV[3]) then return {0, 'store', total} end
redis.call('INCRBY', KEYS[1], size)
redis.call('INCRBY', KEYS[2], size)
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return {1}
"""

# Give a reservation back (the upload failed, or its gateway died). KEYS and ARGV[1] as above.
_FILE_RELEASE = """
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '-1')
redis.call('ZREM', KEYS[4], ARGV[1])
if size < 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[1], size)
redis.call('DECRBY', KEYS[2], size)
return size
"""

# Index a stored file and count it, in place of its reservation (if any) and of an earlier file of
# the same id (if any). KEYS: total counter, tenant counter, reservations, reservation expiry,
# record, the tenant's files, file expiry. ARGV: reservation id ('' none), file id, record (JSON),
# bytes, listed at (ms), expires at (s, '' none).
_FILE_INDEX = """
local size = tonumber(ARGV[4])
local reserved = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local old = redis.call('GET', KEYS[5])
if old then size = size - cjson.decode(old)['bytes'] end
redis.call('INCRBY', KEYS[1], size - reserved)
redis.call('INCRBY', KEYS[2], size - reserved)
redis.call('SET', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[2])
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[7], ARGV[6], ARGV[2]) end
return 1
"""

# Forget a file and uncount it, once. KEYS: total counter, tenant counter, record, the tenant's
# files, file expiry. ARGV: file id. Returns the bytes freed (0: it was gone already).
_FILE_FORGET = """
local old = redis.call('GET', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if not old then return 0 end
local size = cjson.decode(old)['bytes']
redis.call('DEL', KEYS[3])
redis.call('DECRBY', KEYS[1], size)
redis.call('DECRBY', KEYS[2], size)
return size
"""


class FileScripts:
    """The file store's counted steps; redis-py loads them on ``NOSCRIPT`` by itself."""

    def __init__(self, redis: Redis) -> None:
        self.reserve: AsyncScript = redis.register_script(_FILE_RESERVE)
        self.release: AsyncScript = redis.register_script(_FILE_RELEASE)
        self.index: AsyncScript = redis.register_script(_FILE_INDEX)
        self.forget: AsyncScript = redis.register_script(_FILE_FORGET)


# Create a batch, unless its tenant has its limit of unfinished ones already; its tenant's batches
# wait in the order they came (a batch made in the same millisecond as the last goes after it), and
# a tenant new to the batch slots joins them at the head of the turns. KEYS: batch hash, the
# tenant's batch listing, unfinished batches, the tenant's unfinished batches, turns. ARGV: limit
# (0: none), batch id, created at (ms), tenant id, then the hash's (field, value) pairs. Returns {1}
# or {0, unfinished}.
_BATCH_CREATE = """
local held = redis.call('ZCARD', KEYS[4])
if tonumber(ARGV[1]) > 0 and held >= tonumber(ARGV[1]) then return {0, held} end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
local last = tonumber(redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')[2])
redis.call('ZADD', KEYS[4], math.max(tonumber(ARGV[3]), (last or 0) + 1), ARGV[2])
redis.call('ZADD', KEYS[5], 'NX', 0, ARGV[4])
return {1}
"""

# A batch finished (or its record went): no longer unfinished, and a tenant with no unfinished batch
# leaves the turns. KEYS: unfinished batches, the tenant's unfinished batches, turns. ARGV: batch
# id, tenant id.
_BATCH_RETIRE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[2]) end
return 1
"""

# A tenant was given a batch slot: it goes to the back of the turns (a count, not a clock: processes'
# clocks differ, and two turns in one millisecond would tie). KEYS: turns. ARGV: tenant id.
_BATCH_TURN = """
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
redis.call('ZADD', KEYS[1], 'XX', (tonumber(last) or 0) + 1, ARGV[1])
return 1
"""

# A run of the tenant gives its slot back if its tenant still owes one, and is marked leaving until
# its slot is free. KEYS: yields, leaving. ARGV: tenant id, batch id.
_BATCH_YIELD = """
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
return 0
"""


class BatchScripts:
    """The Batch API's atomic steps; redis-py loads them on ``NOSCRIPT`` by itself."""

    def __init__(self, redis: Redis) -> None:
        self.move: AsyncScript = redis.register_script(_BATCH_MOVE)
        self.lease_keep: AsyncScript = redis.register_script(_LEASE_KEEP)
        self.lease_release: AsyncScript = redis.register_script(_LEASE_RELEASE)
        self.assign: AsyncScript = redis.register_script(_LINE_ASSIGN)
        self.result: AsyncScript = redis.register_script(_LINE_RESULT)
        self.create: AsyncScript = redis.register_script(_BATCH_CREATE)
        self.retire: AsyncScript = redis.register_script(_BATCH_RETIRE)
        self.turn: AsyncScript = redis.register_script(_BATCH_TURN)
        self.take_yield: AsyncScript = redis.register_script(_BATCH_YIELD)


# -- stored responses (the Responses API) ----------------------------------------------------------


class ResponseScripts:
    """A stored response's status moves, one atomic step each, as a batch's (the same script): a
    cancel, a follower's result and a lost follower's failure never overwrite each other."""

    def __init__(self, redis: Redis) -> None:
        self.move: AsyncScript = redis.register_script(_BATCH_MOVE)
