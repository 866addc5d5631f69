"""Asynchronous closed-loop load: ``concurrency`` clients send requests back to back.

Each request is an OpenAI chat or text completion. A streamed one (the default): the client stamps every
SSE frame that carries output text and reads the token count from the final usage frame. A body with
``"stream": false``: the answer arrives whole (TTFT = end-to-end) and its usage gives the tokens.
aiohttp keeps the client's own CPU cost low (it shares the two cores with the server under test).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.stats import Sample, Segment


@dataclass(frozen=True)
class Call:
    """One HTTP request of a variant: path, JSON body (or pre-serialised bytes) and headers."""

    path: str
    body: dict | bytes
    headers: dict[str, str] = field(default_factory=dict)


class RequestFailed(RuntimeError):
    """A benchmark request got a non-200 answer or an error frame."""


def _frame_text(payload: dict) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def stream_call(session: aiohttp.ClientSession, base_url: str, call: Call) -> Sample:
    """Send one streaming request and time it (TTFT: first frame with output text)."""
    headers = {"content-type": "application/json", **call.headers}
    data = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    started = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    async with session.post(base_url + call.path, data=data, headers=headers) as response:
        if response.status != 200:
            raise RequestFailed(f"{call.path}: HTTP {response.status}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            body = line[5:].strip()
            if body == b"[DONE]":
                break
            payload = json.loads(body)
            if "error" in payload:
                raise RequestFailed(f"{call.path}: error frame {payload['error']}")
            if _frame_text(payload):
                stamps.append(time.perf_counter())
            if payload.get("usage"):
                usage_tokens = payload["usage"].get("completion_tokens")
    end = time.perf_counter()
    first = stamps[0] if stamps else end
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tokens = usage_tokens if usage_tokens is not None else len(stamps)
    return Sample(ttft=first - started, e2e=end - started, tokens=tokens, gaps=gaps)


async def json_call(session: aiohttp.ClientSession, base_url: str, call: Call) -> Sample:
    """Send one non-streamed request and time it: the answer arrives whole (TTFT = e2e, no gaps)."""
    headers = {"content-type": "application/json", **call.headers}
    data = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    started = time.perf_counter()
    async with session.post(base_url + call.path, data=data, headers=headers) as response:
        raw = await response.read()
        if response.status != 200:
            raise RequestFailed(f"{call.path}: HTTP {response.status}: {raw[:500]!r}")
    end = time.perf_counter()
    tokens = int(json.loads(raw)["usage"]["completion_tokens"])
    return Sample(ttft=end - started, e2e=end - started, tokens=tokens)


async def send(session: aiohttp.ClientSession, base_url: str, call: Call) -> Sample:
    """:func:`json_call` for a body that says ``"stream": false``, else :func:`stream_call`."""
    if isinstance(call.body, dict) and call.body.get("stream") is False:
        return await json_call(session, base_url, call)
    return await stream_call(session, base_url, call)


async def closed_loop(base_url: str, calls: Sequence[Call], concurrency: int) -> Segment:
    """Run ``calls`` with ``concurrency`` workers, each sending its next call when the previous ends."""
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                samples.append(await send(session, base_url, queue.get_nowait()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Segment(samples=samples, wall=wall)


def run_segment(base_url: str, calls: Sequence[Call], concurrency: int) -> Segment:
    """Blocking wrapper of :func:`closed_loop`."""
    return asyncio.run(closed_loop(base_url, calls, concurrency))


def run_calls(base_url: str, make: Callable[[int], Call], n: int, concurrency: int) -> Segment:
    """Closed loop over ``make(0) … make(n-1)``."""
    return run_segment(base_url, [make(i) for i in range(n)], concurrency)
