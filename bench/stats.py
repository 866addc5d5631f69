"""Pure helpers of the overhead benchmark: per-request samples → point figures → ratios → summary.

Nothing here touches the network or the clock; ``tests/bench`` checks these functions.

Figures of one *point* (one variant at one concurrency, possibly several interleaved segments):

* ``throughput_tok_s``: output tokens / wall seconds, summed over the point's segments;
* ``ttft_p50_ms``/``ttft_p99_ms``: time to the first streamed content;
* ``itl_p50_ms``: median gap between consecutive content frames (one token each when streaming keeps up);
* ``tpot_p50_ms``: median over requests of (e2e - ttft) / (tokens - 1);
* ``e2e_p50_ms``/``e2e_p99_ms``: request start to the end of its stream.

A *ratio* is variant / baseline for every figure (so > 1 is slower for latencies and *faster* for
throughput); an *overhead* is the cost as a fraction: ``1/throughput_ratio - 1`` or ``latency_ratio - 1``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Figures where bigger is better; every other figure is a latency.
HIGHER_IS_BETTER = ("throughput_tok_s", "request_rate")
RATIO_FIGURES = ("throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "e2e_p50_ms", "e2e_p99_ms")
# summary.json key of each ratio (the output contract other tools read).
RATIO_KEYS = {
    "throughput_tok_s": "throughput_ratio",
    "ttft_p50_ms": "ttft_p50_ratio",
    "ttft_p99_ms": "ttft_p99_ratio",
    "itl_p50_ms": "itl_p50_ratio",
    "e2e_p50_ms": "e2e_p50_ratio",
    "e2e_p99_ms": "e2e_p99_ratio",
}
SUMMARY_VARIANTS = ("bare", "patch", "suffix", "stack2", "text_prompt", "lora", "client_embeds")


@dataclass
class Sample:
    """One streamed request, times in seconds from its start."""

    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class Segment:
    """One closed-loop run of a variant: its samples and its wall time."""

    samples: list[Sample]
    wall: float
    # Share of the machine's CPU used by processes outside the benchmark while it ran (0..1; NaN = unknown).
    foreign_cpu: float = math.nan

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def point_figures(segments: Sequence[Segment]) -> dict[str, float]:
    """The figures of one point from its segments (see the module docstring)."""
    samples = [s for seg in segments for s in seg.samples]
    if not samples:
        raise ValueError("a point needs at least one sample")
    wall = sum(seg.wall for seg in segments)
    ttft = [s.ttft * 1000 for s in samples]
    e2e = [s.e2e * 1000 for s in samples]
    gaps = [g * 1000 for s in samples for g in s.gaps]
    tpot = [t * 1000 for s in samples if (t := s.tpot) is not None]
    return {
        "requests": len(samples),
        "wall_s": wall,
        "throughput_tok_s": sum(seg.tokens for seg in segments) / wall,
        "request_rate": len(samples) / wall,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "itl_p50_ms": statistics.median(gaps) if gaps else math.nan,
        "tpot_p50_ms": statistics.median(tpot) if tpot else math.nan,
        "e2e_p50_ms": statistics.median(e2e),
        "e2e_p99_ms": percentile(e2e, 0.99),
    }


def ratios(figures: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """``{throughput_ratio: …, ttft_p50_ratio: …, …}``: each figure over the baseline's."""
    out = {}
    for figure, key in RATIO_KEYS.items():
        base = baseline.get(figure)
        value = figures.get(figure)
        out[key] = value / base if base and value is not None and not math.isnan(base) else math.nan
    return out


def segment_throughput_ratios(variant: Sequence[Segment], baseline: Sequence[Segment]) -> list[float]:
    """Throughput ratio of each interleaved repeat on its own (the spread shows the run's noise)."""
    return [(v.tokens / v.wall) / (b.tokens / b.wall) for v, b in zip(variant, baseline, strict=False)]


def throughput_overhead(throughput_ratio: float) -> float:
    """Extra time per output token as a fraction: 0.05 = 5% slower (negative = faster than the baseline)."""
    return 1 / throughput_ratio - 1


def summary_entry(figures: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """One ``summary.json`` cell: the ratios, then the absolute figures they came from."""
    return {**ratios(figures, baseline), **{k: figures[k] for k in RATIO_FIGURES + ("tpot_p50_ms", "requests")}}


def build_summary(
    points: Mapping[str, Mapping[int, Mapping[str, float]]],
    baselines: Mapping[str, str],
    unsupported: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """``{variant: {concurrency: cell}}`` for the contract's variants, ratios against each one's baseline.

    Args:
        points: Figures per variant and concurrency (any variant names; baselines must be among them).
        baselines: Variant → the variant its ratios are taken against (``bare`` unless said otherwise).
        unsupported: Variant → why it could not be measured; becomes ``{"supported": false, "reason": …}``.
    """
    summary: dict[str, object] = {}
    for variant in SUMMARY_VARIANTS:
        if unsupported and variant in unsupported:
            summary[variant] = {"supported": False, "reason": unsupported[variant]}
            continue
        if variant not in points:
            continue
        base = points[baselines.get(variant, "bare")]
        summary[variant] = {
            str(c): summary_entry(figures, base[c]) for c, figures in sorted(points[variant].items()) if c in base
        }
    return summary


def jsonable(value: object) -> object:
    """``value`` with NaN/inf replaced by None (strict JSON) and int dict keys as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def check_target(name: str, value: float, op: str, bound: float, note: str = "") -> dict[str, object]:
    """One target line: ``value op bound`` (``op`` is ``<=`` or ``>=``), and whether it holds."""
    met = value <= bound if op == "<=" else value >= bound
    return {"target": name, "value": value, "op": op, "bound": bound, "met": bool(met), "note": note}


def mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan
