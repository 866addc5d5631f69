"""Live toxicity telemetry: finished completions scored by the offline toxicity classifier, off the
request path, into per-tenant/stack and per-patch-version counters beside the refusal counters.

The request path only *offers* a completion's texts (:meth:`ToxicityMeter.offer`, a non-blocking put on a
bounded queue). One supervised background task (:meth:`ToxicityMeter.run`) takes what is queued, scores it
in batches in a worker thread and counts it. When the queue is full, the offer is dropped and counted
(``patchserve_toxicity_dropped_total``): a burst costs telemetry, never latency or memory.

The classifier is :mod:`patches.toxicity`'s (``alt-profanity-check``, a bag-of-words linear model
applied from its fitted parameters: a few ms per call, see the README), so a text is toxic at a score
of at least ``TOXIC`` (0.5), as in ``patchserve eval --mode toxicity``. Its limits are that module's:
it reads words, not meaning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from patches.format import Patch
from patches.toxicity import TOXIC, Scorer
from server.metrics import Metrics


@dataclass(frozen=True)
class _Offer:
    tenant: str
    stack: str
    patches: tuple[tuple[str, str], ...]  # (name, version) of each patch in the stack
    texts: tuple[str, ...]


class ToxicityMeter:
    """Scores completions in the background and counts the toxic ones.

    Args:
        metrics: Where the counts go (``patchserve_toxicity_scored``, ``patchserve_toxic_completions``,
            ``patchserve_patch_toxic_completions``, ``patchserve_toxicity_dropped``).
        scorer: The classifier (:func:`patches.toxicity.default_scorer` in the server).
        max_pending: Offers queued at most; more are dropped and counted.
        batch: Texts scored per classifier call at most.
    """

    def __init__(self, metrics: Metrics, scorer: Scorer, *, max_pending: int = 4096, batch: int = 256) -> None:
        self.metrics = metrics
        self.scorer = scorer
        self.batch = batch
        self._queue: asyncio.Queue[_Offer] = asyncio.Queue(maxsize=max_pending)

    def offer(self, tenant: str, stack: str, patches: Iterable[Patch], texts: Iterable[str]) -> None:
        """Queue a finished completion's texts for scoring; never blocks (a full queue drops them)."""
        item = _Offer(tenant, stack, tuple((p.name, str(p.version)) for p in patches), tuple(texts))
        if not item.texts:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.toxicity_dropped.inc(len(item.texts))

    def pending(self) -> int:
        """Offers waiting to be scored."""
        return self._queue.qsize()

    async def run(self, stop: asyncio.Event) -> None:
        """Score and count until ``stop`` is set (supervised: an exception is logged, counted and restarted)."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                items = [getter.result()]
                while not self._queue.empty() and sum(len(i.texts) for i in items) < self.batch:
                    items.append(self._queue.get_nowait())
                await self._score(items)
        finally:
            stopping.cancel()

    async def drain(self) -> None:
        """Score everything queued now (for tests; :meth:`run` is the server's path)."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        if items:
            await self._score(items)

    async def _score(self, items: list[_Offer]) -> None:
        texts = [t for item in items for t in item.texts]
        scores = await asyncio.to_thread(self.scorer.score, texts)
        if len(scores) != len(texts):
            raise RuntimeError(f"toxicity scorer returned {len(scores)} scores for {len(texts)} texts")
        at = 0
        for item in items:
            toxic = sum(s >= TOXIC for s in scores[at : at + len(item.texts)])
            at += len(item.texts)
            self.metrics.count_toxicity(item.tenant, item.stack, item.patches, len(item.texts), toxic)
