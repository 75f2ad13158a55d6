"""Multi-step Redis operations that must be atomic, as Lua scripts (one place, like the names)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

# Reset the idle time of the entries a consumer still owns, and only those: a plain XCLAIM would
# silently take back an entry that another worker has already reclaimed. Returns the ids that the
# consumer no longer owns (the caller's job was taken over and must stop).
_REFRESH_CLAIMS = """
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
"""


class Scripts:
    def __init__(self, redis: Redis) -> None:
        self._refresh: AsyncScript = redis.register_script(_REFRESH_CLAIMS)

    async def refresh_claims(self, stream: str, group: str, consumer: str, ids: list[str]) -> list[str]:
        """Keep ``consumer``'s claims on ``ids`` fresh; returns the ids it no longer owns."""
        lost = await self._refresh(keys=[stream, group], args=[consumer, *ids])
        return [x.decode() if isinstance(x, bytes) else str(x) for x in lost]
