"""The daemon's side of the Redis tier: opening it from ``[cache]``, and the probe task.

The tier itself (`slurpfs.cache.redis_tier`) makes no call on its own: the probe
pings the server every `PROBE_INTERVAL` seconds from a worker thread, so the
``redis`` health check knows whether the server answers and which eviction policy
it runs even on an idle node, and an outage ends as soon as the server is back.
"""

from __future__ import annotations

import trio

from slurpfs.cache.redis_tier import RedisStatistics, RedisTier, read_password
from slurpfs.config import CacheConfig
from slurpfs.errors import ConfigError
from slurpfs.metrics import Latency
from slurpfs.service.supervisor import Stoppable

PROBE_INTERVAL = 5.0  # seconds


def open_tier(config: CacheConfig, latency: Latency) -> RedisTier | None:
    """The tier ``cache.redis_url`` names (None when empty). ConfigError when the
    password file cannot be read. Connects lazily: a server that is down at start
    is an outage like any other, not a failed mount."""
    if not config.redis_url:
        return None
    try:
        password = read_password(config.redis_password_file)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(
            f"cache.redis_password_file: cannot read {config.redis_password_file}: {reason}"
        ) from None
    return RedisTier(
        config.redis_url,
        password=password,
        ttl=config.redis_ttl,
        timeout=config.redis_timeout,
        latency=latency,
    )


class RedisProbe(Stoppable):
    """Probes the tier every `interval` seconds (see module docstring)."""

    def __init__(self, tier: RedisTier, interval: float = PROBE_INTERVAL) -> None:
        super().__init__()
        self.tier = tier
        self.interval = interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.stoppable():
            task_status.started()
            while True:
                await trio.to_thread.run_sync(self.tier.probe, abandon_on_cancel=True)
                await trio.sleep(self.interval)

    def statistics(self) -> RedisStatistics:
        return self.tier.statistics()
