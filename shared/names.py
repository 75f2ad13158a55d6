"""Every Redis key, stream, group and channel name Switchyard uses, built in one place.

All names start with a configurable prefix (``switchyard`` by default) so several deployments, or
several test runs, can share one Redis. They are plain strings meant to be typed into ``redis-cli``:

    XLEN       switchyard:jobs:<model>:<tenant>          backlog of one tenant for one model
    XPENDING   switchyard:jobs:<model>:<tenant> workers  jobs taken by workers, not yet finished
    HGETALL    switchyard:streams:<model>                every job stream of a model: tenant, priority
    HGETALL    switchyard:tenants                        tenants and their limits
    HGETALL    switchyard:removed-tenants                removed tenants whose data is being removed
    ZRANGE     switchyard:workers 0 -1 WITHSCORES        live workers by last heartbeat
    GET        switchyard:worker:<id>                    what one worker serves (JSON)
    PUBSUB CHANNELS switchyard:reply:*                   requests being answered right now
    LRANGE     switchyard:progress:<request> 0 -1        every reply of one request so far (kept a while)

The Batch API and the background role (``switchyard background``) keep theirs beside them:

    XLEN       switchyard:batchjobs:<model>:<tenant>     batch lines of a tenant waiting or running
    HGETALL    switchyard:batch:<id>                     one batch: status, counts, timestamps
    HLEN       switchyard:batch:<id>:results             its lines with a result (output or error)
    HGETALL    switchyard:batch:<id>:jobs                its lines on a worker queue now: job ids
    SMEMBERS   switchyard:active-batches                 batches not finished yet
    ZRANGE     switchyard:active-batches:<tenant id> 0 -1 a tenant's, in the order they get a batch slot
    ZRANGE     switchyard:batch-turns 0 -1 WITHSCORES    tenants by when they last got a batch slot
    HGETALL    switchyard:batch-yields                   batch slots a tenant's runs are to give back
    HGETALL    switchyard:batch-leaving                  runs giving their batch slot back now
    GET        switchyard:file:<id>                      one uploaded or produced file (JSON)
    GET        switchyard:file-bytes:<tenant>            bytes a tenant's files take, against its quota
    ZRANGE     switchyard:files:<tenant> 0 -1            a tenant's files, oldest first
    HGETALL    switchyard:usage:<tenant>:<YYYY-MM-DD>    a tenant's usage that day, per hour and model
    XREVRANGE  switchyard:housekeeping + - COUNT 10      the last housekeeping runs
    ZRANGE     switchyard:arq 0 -1 WITHSCORES            background jobs queued for arq
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
"""Consumer group that every worker of a model joins on each of that model's job streams."""

JOB_FIELD = "job"
"""Stream entry field that holds the JSON-encoded job."""

HANDED_BACK_FIELD = "handed_back"
"""Stream entry field set when a stopping worker re-queued a job it had begun."""


def as_text(value: bytes | str) -> str:
    """A name as a Redis reply gives it (a stream, an entry id, a consumer, a channel's data), as text."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str = "switchyard"

    def jobs_stream(self, model: str, tenant: str) -> str:
        return f"{self.prefix}:jobs:{model}:{tenant}"

    def streams_index(self, model: str) -> str:
        """Hash: job stream of a model -> its tenant's priority class, so workers find them all."""
        return f"{self.prefix}:streams:{model}"

    def reply_channel(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    def hub_channel(self) -> str:
        """Channel each gateway's reply connection stays subscribed to (nothing is published on it):
        its confirmation tells the gateway the connection is up."""
        return f"{self.prefix}:gateway-hub"

    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    def cancelled(self, request_id: str) -> str:
        """Marker left when a client gave up, so a worker that takes the job later skips it."""
        return f"{self.prefix}:cancelled:{request_id}"

    def progress(self, request_id: str) -> str:
        """List of every reply a job has published so far (``LRANGE ... 0 -1``): another worker
        resumes the job from its tokens, a client that lost its stream takes it up again from
        here. Kept a while after the job ends."""
        return f"{self.prefix}:progress:{request_id}"

    def owner(self, request_id: str) -> str:
        """The tenant whose request a job is: only that tenant's keys may take up its stream."""
        return f"{self.prefix}:owner:{request_id}"

    def attached(self, request_id: str) -> str:
        """How many times a client took up the job's stream again (a gateway that lost the
        client's connection waits a while for this to move before it stops the job)."""
        return f"{self.prefix}:attached:{request_id}"

    def idempotency(self, tenant: str, digest: str) -> str:
        """A tenant's request under an ``Idempotency-Key`` (its digest): what it became (JSON)."""
        return f"{self.prefix}:idempotency:{tenant}:{digest}"

    def inbox(self, worker_id: str) -> str:
        """Channel on which a worker is told of a job another worker handed to it (prefix affinity)."""
        return f"{self.prefix}:inbox:{worker_id}"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def models(self) -> str:
        """Hash of every model a worker has ever served here, to tell 'unknown' from 'no worker now'."""
        return f"{self.prefix}:models"

    def tenants(self) -> str:
        """Hash: tenant name -> its limits (JSON)."""
        return f"{self.prefix}:tenants"

    def removed_tenants(self) -> str:
        """Hash: id of a removed tenant -> its tombstone (JSON: name, when), so that nothing of it
        reaches a tenant given the same name later while housekeeping removes what it had."""
        return f"{self.prefix}:removed-tenants"

    def removed_files(self, tenant_id: str) -> str:
        """A removed tenant's file listing (``files:<tenant>`` at its removal), for housekeeping."""
        return f"{self.prefix}:removed:{tenant_id}:files"

    def removed_batches(self, tenant_id: str) -> str:
        """A removed tenant's batch listing (``batches:<tenant>`` at its removal), for housekeeping."""
        return f"{self.prefix}:removed:{tenant_id}:batches"

    def keys(self) -> str:
        """Hash: API key id -> the key's tenant and hash (JSON); never the key itself."""
        return f"{self.prefix}:keys"

    def rate(self, tenant: str, what: str) -> str:
        """Rate-limit state of one tenant: ``req``/``tok`` windows, ``amt`` reservations, ``sum``."""
        return f"{self.prefix}:rate:{tenant}:{what}"

    def inflight(self, tenant: str) -> str:
        """Sorted set of a tenant's admitted, unfinished requests (score: when the slot expires)."""
        return f"{self.prefix}:inflight:{tenant}"

    def drained(self, model: str) -> str:
        """Counter of jobs finished for a model; its rate estimates how fast a backlog drains."""
        return f"{self.prefix}:drained:{model}"

    def dead_letter(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    # -- the Batch API and the background role (``switchyard background``) -----------------------

    def batch_stream(self, model: str, tenant: str) -> str:
        """Job stream of a tenant's batch lines for one model, read at batch priority (its own
        prefix, so no model or tenant name can make it collide with an interactive stream)."""
        return f"{self.prefix}:batchjobs:{model}:{tenant}"

    def file(self, file_id: str) -> str:
        """One file's record (JSON): owner, name, purpose, size, expiry."""
        return f"{self.prefix}:file:{file_id}"

    def file_data(self, file_id: str) -> str:
        """A file's bytes, when files are kept in Redis (``SWITCHYARD_FILE_STORE=redis``)."""
        return f"{self.prefix}:file-data:{file_id}"

    def files(self, tenant: str) -> str:
        """Sorted set of a tenant's file ids by creation time (ms)."""
        return f"{self.prefix}:files:{tenant}"

    def file_expiry(self) -> str:
        """Sorted set of every file id by the time (s) it expires."""
        return f"{self.prefix}:file-expiry"

    def file_bytes(self) -> str:
        """Counter of the bytes every stored file takes (and uploads under way have reserved),
        checked against the store's bound."""
        return f"{self.prefix}:file-bytes"

    def tenant_file_bytes(self, tenant: str) -> str:
        """Counter of the bytes a tenant's files take (and its uploads under way have reserved),
        checked against its quota."""
        return f"{self.prefix}:file-bytes:{tenant}"

    def file_reservations(self) -> str:
        """Hash: ``<tenant>|<random>`` -> bytes an upload under way reserved from its Content-Length."""
        return f"{self.prefix}:file-reservations"

    def file_reservation_expiry(self) -> str:
        """Sorted set of reservations by when (s) they lapse: an upload whose gateway died."""
        return f"{self.prefix}:file-reservation-expiry"

    def batch(self, batch_id: str) -> str:
        """Hash of one batch: its request (JSON), status, timestamps, counts and files."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_results(self, batch_id: str) -> str:
        """Hash: custom_id -> the line's output (or error) line, written once."""
        return f"{self.prefix}:batch:{batch_id}:results"

    def batch_jobs(self, batch_id: str) -> str:
        """Hash: custom_id -> job id of the line's attempt on a worker queue now."""
        return f"{self.prefix}:batch:{batch_id}:jobs"

    def batch_lease(self, batch_id: str) -> str:
        """Who feeds the batch now (a random token with a short expiry), so only one process does."""
        return f"{self.prefix}:batch:{batch_id}:lease"

    def batches(self, tenant: str) -> str:
        """Sorted set of a tenant's batch ids by creation time (ms)."""
        return f"{self.prefix}:batches:{tenant}"

    def active_batches(self) -> str:
        """Set of the batches not finished yet (validating, in progress, finalizing, cancelling)."""
        return f"{self.prefix}:active-batches"

    def tenant_active_batches(self, owner: str) -> str:
        """Sorted set of one tenant's unfinished batches by creation time (ms), by tenant id: the
        batches that wait for a slot, in the order they get one."""
        return f"{self.prefix}:active-batches:{owner}"

    def batch_turns(self) -> str:
        """Sorted set: tenant id -> the turn (a count) it was last given a batch slot at, 0 for a
        tenant not given one yet; a free slot goes to the tenant given one longest ago."""
        return f"{self.prefix}:batch-turns"

    def batch_yields(self) -> str:
        """Hash: tenant id -> batch slots its runs should give back to tenants below their share."""
        return f"{self.prefix}:batch-yields"

    def batch_leaving(self) -> str:
        """Hash: batch id -> tenant id, of the runs giving their slot back (their lines draining)."""
        return f"{self.prefix}:batch-leaving"

    def batch_expiry(self) -> str:
        """Sorted set of finished batch ids by the time (s) their records are deleted."""
        return f"{self.prefix}:batch-expiry"

    def batch_stats(self) -> str:
        """Hash: batch lines finished ever, by outcome (``completed``, ``failed``)."""
        return f"{self.prefix}:batch-stats"

    def usage_log(self) -> str:
        """Stream of finished requests (tenant, model, tokens, error) waiting to be rolled up."""
        return f"{self.prefix}:usage-log"

    def usage_cursor(self) -> str:
        """Id of the last usage-log entry rolled up."""
        return f"{self.prefix}:usage-cursor"

    def usage(self, tenant: str, day: str) -> str:
        """Hash of a tenant's usage on one UTC day (``YYYY-MM-DD``): ``HH|model|metric`` -> count."""
        return f"{self.prefix}:usage:{tenant}:{day}"

    def usage_tenants(self) -> str:
        """Set of the tenants with rolled-up usage."""
        return f"{self.prefix}:usage-tenants"

    def arq_queue(self) -> str:
        """arq's queue of background jobs (sorted set of job ids by when they are due). arq keeps
        each job under its own fixed ``arq:job:<id>``; ids start with this prefix."""
        return f"{self.prefix}:arq"

    def background_job(self, kind: str, key: str) -> str:
        """Id of one background job, e.g. one run of a batch."""
        return f"{self.prefix}:{kind}:{key}"

    def cron(self, name: str) -> str:
        """Name of a housekeeping job; arq names each of its runs ``<this>:<scheduled ms>``."""
        return f"{self.prefix}:cron:{name}"

    def cron_ran(self, name: str, tick: str) -> str:
        """Marker that one tick of a housekeeping job ran, so it runs once per tick however many
        processes schedule it."""
        return f"{self.prefix}:cron-ran:{name}:{tick}"

    def housekeeping_log(self) -> str:
        """Stream of housekeeping runs: job, tick, process, what it did."""
        return f"{self.prefix}:housekeeping"
