"""What patchserve's server layer costs over vLLM's own OpenAI server (``make bench-server``).

patchserve's bare tenant (``bare``: no patch, so the engine does exactly what vLLM's server does) against
vLLM's own OpenAI server (``vllm_bare``) with the same model and engine arguments
(:data:`bench.variants.ENGINE`, eager unless ``--compiled``, the same ``gpu_memory_utilization``
:data:`MEMORY_SHARE`: both engines are up at once). Chat completions, greedy, ``max_tokens`` output tokens
(EOS ignored), non-streamed (``nostream``) and streamed (``stream``), at each concurrency. Each *round*
runs every point once on each server, the two servers in rotating order and on the same fresh prompts, so
drift of the shared machine hits both alike; a round's throughput ratio patchserve / vLLM is one value of
the spread (per-round values, min and median are reported, and the ratio of the pooled figures).

Besides throughput, each segment's CPU time of the two API-server processes (without their engine-core
children) per request: the server layer's own cost, which the engine does not dilute. With ``--profile
SECONDS`` both API processes are then sampled with py-spy at the highest concurrency of each mode, and the
busiest functions — and patchserve's own (``server/``) ones — are printed and kept.

Run: ``python -m bench.server_overhead [--quick] [--rounds N] [--profile 20]``; ``make bench`` runs it as
its ``server`` phase. Writes ``server_overhead.json`` and ``server_overhead.md`` to ``$PATCHSERVE_BENCH_OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import psutil

from bench.launch import prepare_root, running_server_process, server_env
from bench.loadgen import Call, run_segment
from bench.profile import py_spy
from bench.segments import Matrix, log, rotated, warm_up
from bench.stats import Segment, check_target, jsonable, point_figures, segment_throughput_ratios
from bench.variants import (
    DEMO_TRUST,
    MODEL_ID,
    TENANT_OF,
    engine_args,
    patchserve_call,
    vllm_chat_call,
    vllm_server_process,
)
from bench.workload import Options, PromptBook, add_load_arguments, apply_overrides, request_count

MEMORY_SHARE = 0.12  # gpu_memory_utilization of each engine: two run at once beside other jobs
SERVERS = ("bare", "vllm_bare")
MODES = ("nostream", "stream")
TARGET = 0.98  # patchserve throughput / vLLM's at the highest concurrency


def variant(server: str, mode: str) -> str:
    """The matrix key of one server in one mode, e.g. ``bare/nostream``."""
    return f"{server}/{mode}"


def make_call(server: str, mode: str, prompt: str, max_tokens: int) -> Call:
    """One chat request of ``server`` (``bare``: patchserve's bare tenant; ``vllm_bare``: vLLM's server)."""
    stream = mode == "stream"
    if server == "bare":
        return patchserve_call("bare", prompt, max_tokens, stream=stream)
    if server == "vllm_bare":
        return vllm_chat_call(MODEL_ID, prompt, max_tokens, stream=stream)
    raise ValueError(f"unknown server {server!r}")


# --- the rounds -----------------------------------------------------------------------------------------


def order(round_index: int, concurrency: int, mode_index: int) -> list[str]:
    """Which server goes first in a point: rotates with the round, the concurrency and the mode."""
    return rotated(SERVERS, round_index + concurrency + mode_index)


def api_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of the API-server process itself (not its engine-core children)."""
    times = process.cpu_times()
    return times.user + times.system


def run_rounds(
    matrix: Matrix,
    urls: Mapping[str, str],
    processes: Mapping[str, psutil.Process],
    book: PromptBook,
    sizes: Mapping[int, int],
    opts: Options,
) -> dict[str, dict[int, list[float]]]:
    """``opts.repeats`` rounds: per concurrency and mode, one segment of ``sizes[c]`` requests per server
    (rotating order, same prompts). Returns the API process's CPU ms per request of each kept segment
    (segments that were re-run because the machine was busy are left out: their CPU covers two runs)."""
    cpu: dict[str, dict[int, list[float]]] = {}
    for r in range(opts.repeats):
        for c in opts.concurrencies:
            for m, mode in enumerate(MODES):
                for server in order(r, c, m):
                    key = variant(server, mode)

                    def calls(attempt: int, server: str = server, mode: str = mode, c: int = c, r: int = r) -> list:
                        prompts = book.get(("server", mode, c, r, attempt), sizes[c])
                        return [make_call(server, mode, p, opts.max_tokens) for p in prompts]

                    reruns, before = len(matrix.reruns), api_cpu_seconds(processes[server])
                    segment = matrix.run(urls[server], key, c, calls)
                    spent = api_cpu_seconds(processes[server]) - before
                    per_request = spent * 1000 / len(segment.samples)
                    if len(matrix.reruns) == reruns:
                        cpu.setdefault(key, {}).setdefault(c, []).append(per_request)
                    tput = segment.tokens / segment.wall
                    log(f"  round {r} c={c:<3} {key:<18} {tput:7.1f} tok/s, API {per_request:5.1f} CPU ms/request")
    return cpu


def overhead_rows(
    segments: Mapping[str, Mapping[int, Sequence[Segment]]],
    cpu_ms: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
) -> dict[str, dict[int, dict[str, object]]]:
    """Per mode and concurrency: patchserve / vLLM throughput ratio of the pooled segments, of each round
    (``per_round``, with ``min`` and ``median``), the e2e p50 ratio, both throughputs, and the API
    processes' mean CPU ms per request when ``cpu_ms`` has them."""
    rows: dict[str, dict[int, dict[str, object]]] = {}
    for mode in MODES:
        ours, theirs = segments.get(variant("bare", mode), {}), segments.get(variant("vllm_bare", mode), {})
        for c in sorted(set(ours) & set(theirs)):
            per_round = segment_throughput_ratios(ours[c], theirs[c])
            if not per_round:
                continue
            mine, base = point_figures(ours[c]), point_figures(theirs[c])
            row: dict[str, object] = {
                "throughput_ratio": mine["throughput_tok_s"] / base["throughput_tok_s"],
                "per_round": per_round,
                "min": min(per_round),
                "median": statistics.median(per_round),
                "e2e_p50_ratio": mine["e2e_p50_ms"] / base["e2e_p50_ms"],
                "patchserve_tok_s": mine["throughput_tok_s"],
                "vllm_tok_s": base["throughput_tok_s"],
            }
            if cpu_ms is not None:
                for server, name in (("bare", "patchserve"), ("vllm_bare", "vllm")):
                    values = (cpu_ms.get(variant(server, mode)) or {}).get(c) or []
                    row[f"{name}_api_cpu_ms_per_request"] = statistics.mean(values) if values else math.nan
            rows.setdefault(mode, {})[c] = row
    return rows


def targets(rows: Mapping[str, Mapping[int, Mapping[str, object]]]) -> list[dict[str, object]]:
    """patchserve at >= :data:`TARGET` of vLLM's server throughput at the highest concurrency, per mode."""
    lines = []
    for mode, by_c in rows.items():
        if by_c:
            c = max(by_c)
            row = by_c[c]
            note = f"median of rounds {row['median']:.3f}, min {row['min']:.3f}"
            lines.append(check_target(f"server overhead ({mode}), c={c}", row["throughput_ratio"], ">=", TARGET, note))
    return lines


def markdown(rows: Mapping[str, Mapping[int, Mapping[str, object]]]) -> str:
    """The server-overhead table: one row per mode and concurrency."""
    out = [
        "| patchserve bare / vLLM server bare | c | throughput ratio | per round | min | median | e2e p50 ratio "
        "| tok/s patchserve / vLLM | API CPU ms/request patchserve / vLLM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, by_c in rows.items():
        for c, row in sorted(by_c.items()):
            rounds = ", ".join(f"{v:.3f}" for v in row["per_round"])  # type: ignore[attr-defined]
            cpu = (row.get("patchserve_api_cpu_ms_per_request"), row.get("vllm_api_cpu_ms_per_request"))
            cpu_text = "–" if any(v is None or math.isnan(v) for v in cpu) else f"{cpu[0]:.1f} / {cpu[1]:.1f}"
            out.append(
                f"| {mode} | {c} | **{row['throughput_ratio']:.3f}** | {rounds} | {row['min']:.3f} "
                f"| {row['median']:.3f} | {row['e2e_p50_ratio']:.3f} "
                f"| {row['patchserve_tok_s']:.0f} / {row['vllm_tok_s']:.0f} | {cpu_text} |"
            )
    return "\n".join(out)


# --- profiles -------------------------------------------------------------------------------------------

_LINE = re.compile(r":\d+\)$")


def function_shares(collapsed: str, where: str = "") -> tuple[list[tuple[str, float]], int]:
    """Inclusive share of samples of each function (line numbers dropped) in py-spy ``raw`` output,
    busiest first, only functions whose frame mentions ``where`` (e.g. ``server/``); and the sample count."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = {_LINE.sub(")", f) for f in stack.split(";")[1:] if f}  # the first frame is the thread
        for frame in frames:
            if where in frame:
                inclusive[frame] += int(count)
    return [(f, n / max(total, 1)) for f, n in inclusive.most_common()], total


def profile(
    urls: Mapping[str, str], pids: Mapping[str, int], book: PromptBook, opts: Options, seconds: float, out: Path
) -> dict[str, object]:
    """py-spy (``raw``) of each API process under closed-loop load at the highest concurrency, per mode."""
    out.mkdir(parents=True, exist_ok=True)
    c = max(opts.concurrencies)
    result: dict[str, object] = {}
    for mode in MODES:
        for server in SERVERS:
            probe = run_segment(
                urls[server],
                [make_call(server, mode, p, opts.max_tokens) for p in book.get(("pp", mode, server), c)],
                c,
            )
            n = c * (math.ceil((seconds + 6) / probe.wall) + 1)  # outlasts the recording
            calls = [make_call(server, mode, p, opts.max_tokens) for p in book.get(("prof", mode, server), n)]
            path = out / f"{server}-{mode}-c{c}.txt"
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(run_segment, urls[server], calls, c)
                time.sleep(3)
                py_spy(pids[server], seconds, path).wait(timeout=seconds + 60)
                segment = load.result()
            text = path.read_text() if path.is_file() else ""
            everything, total = function_shares(text)
            own, _ = function_shares(text, "server/")
            result[variant(server, mode)] = {
                "samples": total,
                "requests": len(segment.samples),
                "top": everything[:25],
                "server_code": own[:25],
                "file": str(path),
            }
            log(f"profile {variant(server, mode)} c={c}: {total} samples, {segment.tokens / segment.wall:.0f} tok/s")
            for frame, share in (own or everything)[:12]:
                log(f"  {share:6.1%}  {frame}")
    return result


# --- the run --------------------------------------------------------------------------------------------


def patchserve_root(work: Path, model_dir: Path, opts: Options) -> dict[str, str]:
    """A patchserve with one tenant (the bare one) and vLLM's server's engine arguments
    (:func:`bench.variants.engine_args` at :data:`MEMORY_SHARE`); its env."""
    root = work / "patchserve"
    prepare_root(root, [{"id": TENANT_OF["bare"], "allow_unpatched": True}], trust_from=DEMO_TRUST)
    settings = {"enforce_eager": str(not opts.compiled).lower(), "log_level": "warning", "served_model_name": MODEL_ID}
    return server_env(root, model_dir, **settings, **engine_args(MEMORY_SHARE))


def engine_config_line(log_path: Path) -> str:
    """The engine's resolved configuration as vLLM logs it at start-up (to compare the two engines)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "Initializing a V1 LLM engine" in line:
            return line.split("with config: ", 1)[-1]
    return ""


def config_differences(ours: str, theirs: str) -> list[str]:
    """``key=value`` items of two vLLM config lines that differ (model paths and names excepted)."""

    def items(line: str) -> set[str]:
        return {i.strip() for i in re.split(r", (?=\w+=)", line) if i.strip()}

    return sorted(items(ours) ^ items(theirs))


def run(opts: Options, book: PromptBook, work: Path, model_dir: Path, profile_seconds: float = 0) -> dict[str, object]:
    """Both servers up at once; warm-up, sizing, the rounds (and profiles); the rows and targets."""
    logs = {"bare": work / "patchserve-server.log", "vllm_bare": work / "vllm-server.log"}
    with ExitStack() as stack:
        started = time.monotonic()
        ps_url, ps_proc = stack.enter_context(
            running_server_process(patchserve_root(work, model_dir, opts), logs["bare"])
        )
        log(f"patchserve ready in {time.monotonic() - started:.0f}s ({ps_url})")
        vllm_url, vllm_proc = stack.enter_context(
            vllm_server_process(model_dir, opts, None, logs["vllm_bare"], memory_share=MEMORY_SHARE)
        )
        urls = {"bare": ps_url, "vllm_bare": vllm_url}
        processes = {"bare": psutil.Process(ps_proc.pid), "vllm_bare": psutil.Process(vllm_proc.pid)}
        for mode in MODES:
            for server in SERVERS:
                warm_up(urls[server], (server,), lambda s, p, mode=mode: make_call(s, mode, p, opts.max_tokens), book)
        sizes = {}
        for c in opts.concurrencies if opts.repeats else ():  # calibrated on patchserve, streamed: sizes both
            probe = run_segment(
                ps_url,
                [make_call("bare", "stream", p, opts.max_tokens) for p in book.get(("size", c), max(2 * c, 4))],
                c,
            )
            sizes[c] = request_count(len(probe.samples) / probe.wall, c, opts)
            log(f"  c={c}: {opts.repeats} rounds of {sizes[c]} requests per server and mode")
        matrix = Matrix()
        cpu = run_rounds(matrix, urls, processes, book, sizes, opts)
        result: dict[str, object] = {}
        if profile_seconds:
            out = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results")) / "profile"
            pids = {s: p.pid for s, p in processes.items()}
            result["profile"] = profile(urls, pids, book, opts, profile_seconds, out)
    configs = {s: engine_config_line(p) for s, p in logs.items()}
    rows = overhead_rows(matrix.segments, cpu)
    return {
        **result,
        "rows": rows,
        "targets": targets(rows),
        "memory_share": MEMORY_SHARE,
        "engine": {**engine_args(MEMORY_SHARE), "enforce_eager": not opts.compiled},
        "engine_config_differences": config_differences(configs["bare"], configs["vllm_bare"]),
        "requests_per_segment": sizes,
        "rounds": opts.repeats,
        "max_tokens": opts.max_tokens,
        "foreign_cpu": matrix.foreign_cpu(),
    }


def options(quick: bool) -> Options:
    """This benchmark's defaults: 6 rounds over 60 s of work per point and server (quick: a smoke run)."""
    if quick:
        return Options(repeats=2, seconds=4, max_tokens=16, tenant_counts=[])
    return Options(repeats=6, seconds=60, tenant_counts=[])


def main() -> None:
    from patches.basemodel import prepare_default_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 6)")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="then py-spy both API servers")
    args = parser.parse_args()
    opts = options(args.quick)
    apply_overrides(opts, args, repeats=args.rounds)
    out_dir = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="patchserve-server-overhead-"))
    log(f"work dir {work}; results to {out_dir}/")
    started = time.monotonic()
    result = run(opts, PromptBook(), work, prepare_default_model(), args.profile)
    result["duration_s"] = time.monotonic() - started
    (out_dir / "server_overhead.json").write_text(json.dumps(jsonable(result), indent=2))
    text = markdown(result["rows"]) + "\n"  # type: ignore[arg-type]
    (out_dir / "server_overhead.md").write_text(text)
    print(text)  # noqa: T201 - a benchmark's report
    for t in result["targets"]:  # type: ignore[attr-defined]
        log(f"{t['target']}: {t['value']:.3f} {t['op']} {t['bound']}: {'met' if t['met'] else 'NOT met'}")
    if diff := result["engine_config_differences"]:
        log(f"engine configs differ: {diff}")
    log(f"done in {result['duration_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
