"""Message-id dedupe shared by all replicas, on Redis (used when REDIS_URL is set).

A message id is first *claimed* (a short-lived "pending" mark), then *confirmed* for the
dedupe window once the outbox append is durable. A replica that dies between claim and
append leaves only the pending mark, which expires, so the client's retry is accepted
later instead of being dropped as a duplicate. A retry that arrives while the claim is
still pending is answered "in flight, retry later", never silently dropped.

Keys hold a hash of source and message id, never the id itself.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import redis.asyncio as aioredis

from export.outbox import ClaimStatus, dedupe_key

# claim(first, seconds): a pending mark on KEYS[first..] that have none; per key 1 (new),
# 2 (pending: in flight) or 0 (confirmed: a duplicate). Also part of the outbox's script
# that claims and measures the backlog in one call (export.redis_outbox).
CLAIM_FUNCTION = """
local function claim(first, seconds)
  local out = {}
  for i = first, #KEYS do
    local key = KEYS[i]
    if redis.call('SET', key, 'p', 'NX', 'EX', seconds) then
      out[i - first + 1] = 1
    elseif redis.call('GET', key) == 'p' then
      out[i - first + 1] = 2
    else
      out[i - first + 1] = 0
    end
  end
  return out
end
"""
_CLAIM = CLAIM_FUNCTION + "return claim(1, ARGV[1])\n"


DEFAULT_PREFIX = "idgate:dedupe"


def redis_dedupe_key(source: str, message_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    digest = base64.urlsafe_b64encode(dedupe_key(source, message_id)).rstrip(b"=").decode()
    # The hash tag keeps one source's keys in one cluster slot, so the claim script can
    # touch a whole batch at once.
    return f"{prefix}:{{{source}}}:{digest}"


def claim_statuses(keys: Sequence[str], answers: Sequence[int | bytes]) -> list[ClaimStatus]:
    """What the claim script's answers for ``keys`` mean. A message id twice in one call (a
    batch, or requests run as one): a later copy is a duplicate of the first when that one
    is new (the script saw its own pending mark: "in flight"), else whatever the first is.
    The embedded outbox answers the same."""
    statuses = [ClaimStatus(int(x)) for x in answers]
    if len(set(keys)) < len(keys):
        first: dict[str, ClaimStatus] = {}
        for i, key in enumerate(keys):
            if key not in first:
                first[key] = statuses[i]
            else:
                status = first[key]
                statuses[i] = ClaimStatus.DUPLICATE if status is ClaimStatus.NEW else status
    return statuses


class RedisDedupe:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        window_seconds: int,
        claim_seconds: int = 30,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.client = client
        self.window_seconds = window_seconds
        self.claim_seconds = claim_seconds
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)

    def key(self, source: str, message_id: str) -> str:
        return redis_dedupe_key(source, message_id, self.prefix)

    async def claim(self, keys: Sequence[str]) -> list[ClaimStatus]:
        if not keys:
            return []
        return claim_statuses(keys, await self._claim(keys=list(keys), args=[self.claim_seconds]))

    async def confirm(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.set(k, "d", ex=self.window_seconds)
            await pipe.execute()

    async def release(self, keys: Sequence[str]) -> None:
        if keys:
            await self.client.delete(*keys)

    async def forget(self, keys: Sequence[str]) -> int:
        """Remove confirmed entries (a deletion request); returns how many there were."""
        return int(await self.client.delete(*keys)) if keys else 0
