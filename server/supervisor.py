"""Supervised background tasks: a failure is logged, counted and the task restarted; one that keeps
failing makes ``/readyz`` answer 503 with its last error.

Two kinds of task:

* a long-running coroutine (the file watcher): it should run until ``stop``; a crash, or an early
  return, is a failure;
* a periodic tick (the ledger sync): ``tick()`` every ``interval`` seconds; an exception in one tick is
  a failure, a successful tick clears the failure streak.

Restarts back off exponentially (``backoff`` doubling to ``max_backoff``) so a persistent fault does
not spin the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class TaskHealth:
    failures: int = 0  # consecutive
    last_error: str | None = None


class Supervisor:
    """Runs and restarts background tasks.

    Args:
        metrics: Where failures (``patchserve_background_task_failures_total``) and liveness go.
        stop: Set at shutdown; tasks end then.
        unhealthy_after: Consecutive failures after which ``/readyz`` reports the task.
        backoff: First restart delay in seconds (doubles up to ``max_backoff``).
        healthy_after: A long-running task that ran this long before failing starts a new streak.
    """

    def __init__(
        self,
        metrics: Metrics,
        stop: asyncio.Event,
        *,
        unhealthy_after: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
    ) -> None:
        self.metrics = metrics
        self.stop = stop
        self.unhealthy_after = unhealthy_after
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.health: dict[str, TaskHealth] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def problems(self) -> list[str]:
        """What ``/readyz`` reports: tasks failing ``unhealthy_after`` times in a row."""
        return [
            f"background task {name} keeps failing ({h.failures} times in a row): {h.last_error}"
            for name, h in sorted(self.health.items())
            if h.failures >= self.unhealthy_after
        ]

    def run(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Supervise a long-running coroutine that should return only when ``stop`` is set."""
        self._spawn(name, body, interval=None)

    def every(self, name: str, interval: float, tick: Callable[[], Awaitable[None]]) -> None:
        """Supervise ``tick()`` run every ``interval`` seconds."""
        self._spawn(name, tick, interval=interval)

    def _spawn(self, name: str, body: Callable[[], Awaitable[None]], *, interval: float | None) -> None:
        self.health[name] = TaskHealth()
        self._tasks.append(asyncio.create_task(self._loop(name, body, interval), name=f"supervised:{name}"))

    def _failed(self, name: str, error: str) -> float:
        health = self.health[name]
        health.failures += 1
        health.last_error = error
        self.metrics.task_failures.labels(name).inc()
        self.metrics.task_up.labels(name).set(0)
        delay = min(self.max_backoff, self.backoff * 2 ** (health.failures - 1))
        log.error(
            "background task %s failed (%d in a row), restarting in %.1fs: %s", name, health.failures, delay, error
        )
        return delay

    def _ok(self, name: str) -> None:
        health = self.health[name]
        if health.failures:
            log.info("background task %s healthy again after %d failures", name, health.failures)
        health.failures, health.last_error = 0, None
        self.metrics.task_up.labels(name).set(1)

    async def _loop(self, name: str, body: Callable[[], Awaitable[None]], interval: float | None) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if interval is None:
                    self.metrics.task_up.labels(name).set(1)
                await body()
                if interval is None and not self.stop.is_set():
                    raise RuntimeError("returned before shutdown")
                if interval is not None:
                    self._ok(name)
                delay = interval or 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point of supervision
                if interval is None and time.monotonic() - started >= self.healthy_after:
                    self.health[name].failures = 0
                delay = self._failed(name, f"{type(exc).__name__}: {exc}")
                log.debug("task %s traceback", name, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for the tasks to end after ``stop`` was set; cancel the ones that do not."""
        self.stop.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
