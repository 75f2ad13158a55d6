"""Every Redis key, stream, group and channel name Switchyard uses, built in one place.

All names start with a configurable prefix (``switchyard`` by default) so several deployments, or
several test runs, can share one Redis. They are plain strings meant to be typed into ``redis-cli``:

    XLEN       switchyard:jobs:<model>:<tenant>          backlog of one tenant for one model
    XPENDING   switchyard:jobs:<model>:<tenant> workers  jobs taken by workers, not yet finished
    HGETALL    switchyard:streams:<model>                every job stream of a model: tenant, priority
    HGETALL    switchyard:tenants                        tenants and their limits
    ZRANGE     switchyard:workers 0 -1 WITHSCORES        live workers by last heartbeat
    GET        switchyard:worker:<id>                    what one worker serves (JSON)
    PUBSUB CHANNELS switchyard:reply:*                   requests being answered right now
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
"""Consumer group that every worker of a model joins on each of that model's job streams."""

JOB_FIELD = "job"
"""Stream entry field that holds the JSON-encoded job."""

HANDED_BACK_FIELD = "handed_back"
"""Stream entry field set when a stopping worker re-queued a job it had begun."""


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
        """List of the token messages a job has published so far, so another worker can resume it."""
        return f"{self.prefix}:progress:{request_id}"

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
