"""What a patch costs, side by side with the alternatives, in one run (``make bench``).

The real servers are driven over HTTP by an asynchronous closed-loop client (:mod:`bench.loadgen`)
at several concurrencies, with the same prompts and output lengths everywhere (streaming, greedy,
fixed ``max_tokens``, EOS ignored). Variants:

=================  ======================================================================================
``bare``           patchserve, a tenant without patches
``patch``          patchserve, a tenant whose default stack is the shipped 50-token ``refusal`` patch
``suffix``         patchserve, a 50-token *suffix* patch (``guard-suffix``): rows after the prompt, never cached
``stack2``         patchserve, ``refusal`` + a second 50-token patch (``guard``, text-initialised)
``text_prompt``    patchserve, bare tenant, the fixed ~50-token safety system prompt of ``patchserve eval``
``lora``           vLLM's own OpenAI server with ``--enable-lora``: a rank-16 LoRA adapter (ratios to
                   the bare model on that same server, ``vllm_lora_bare``)
``client_embeds``  vLLM's own OpenAI server with ``--enable-prompt-embeds``: the client sends the whole
                   prompt (patch rows + its own embedding of the templated prompt) as ``prompt_embeds``
                   (ratios to the bare model on that same server, ``vllm_bare``)
=================  ======================================================================================

Each point (variant x concurrency) is several segments; the variants' segments are interleaved
(rotating order) so that drift of the noisy machine hits all of them alike, and each segment of a
repeat uses the same fresh prompts for every variant (a prompt is never re-sent, so only shared
prefixes — the patch rows, the template, a system prompt — are prefix-cache hits). Every variant
is warmed first. Besides the table: cold vs warm prefix cache for a patch, 1/100/1,000 tenants with
distinct stacks active at once, swap latency (admin upload and file drop), and resident memory per
loaded patch.

One engine runs at a time: patchserve first, then vLLM's server without LoRA (``vllm_bare``,
``client_embeds``), then with LoRA (``vllm_lora_bare``, ``lora``). Last, the ``server`` phase
(:mod:`bench.server_overhead`) runs patchserve's bare tenant and vLLM's server side by side, both up at
once (smaller engines), streamed and not: the server-overhead row. All engines run eager unless
``--compiled``.

Run: ``python -m bench.overhead [--quick]`` (``make bench``). Writes to ``$PATCHSERVE_BENCH_OUT``
(default ``bench-results/``): ``summary.json`` (``{variant: {concurrency: {throughput_ratio, …}}}``),
``overhead.json`` (everything), ``overhead.md`` (the tables) and ``overhead.png``.

The pieces: :mod:`bench.workload` (options, prompts, point sizes), :mod:`bench.variants` (requests
and servers of each variant), :mod:`bench.segments` (interleaved, watched segments) and
:mod:`bench.patchserve_measures` (memory, cold vs warm, tenants, swap latency); this module runs
them, engine by engine, and writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from bench import report, server_overhead
from bench.alternatives import LORA_NAME, ClientEmbedder, build_lora_adapter, lora_support
from bench.launch import running_server_process
from bench.loadgen import Call
from bench.patchserve_measures import cold_vs_warm, many_tenants, memory_per_patch, swap_times
from bench.segments import Matrix, calibrate, interleaved, log, quiet, warm_up
from bench.stats import build_summary, jsonable, segment_throughput_ratios
from bench.variants import (
    MODEL_ID,
    PATCHSERVE_VARIANTS,
    PREFIX_PATCH,
    messages,
    patchserve_call,
    prepare_patchserve,
    sample_text,
    sampling,
    vllm_chat_call,
    vllm_server,
)
from bench.workload import Options, PromptBook, add_load_arguments, apply_overrides, point_plan, user_prompt
from patches.basemodel import prepare_default_model


def run_patchserve(opts: Options, book: PromptBook, work: Path, model_dir: Path) -> dict[str, object]:
    root = work / "patchserve"
    env, key = prepare_patchserve(opts, root, model_dir)
    patch_dir = root / "patches"
    result: dict[str, object] = {}

    def make(variant: str, prompt: str) -> Call:
        return patchserve_call(variant, prompt, opts.max_tokens)

    started = time.monotonic()
    with running_server_process(env, root / "server.log", torch_threads=opts.api_torch_threads) as (url, popen):
        log(f"patchserve ready in {time.monotonic() - started:.0f}s ({url}); warming up")
        process = psutil.Process(popen.pid)
        # First, before any traffic has left freed memory in the allocator for new patches to reuse.
        log("memory per loaded patch")
        result["memory"] = memory_per_patch(url, process, patch_dir, model_dir, key, opts.memory_patches)
        warm_up(url, PATCHSERVE_VARIANTS, make, book)
        plans = calibrate(url, make, book, opts)
        result["segments_and_requests_per_point"] = plans
        matrix = Matrix()
        log("main table (patchserve variants)")
        interleaved(matrix, url, PATCHSERVE_VARIANTS, make, book, plans, opts)
        result["matrix"] = matrix
        log("cold vs warm prefix cache")
        quiet()
        result["cold_vs_warm"] = cold_vs_warm(url, book, opts)
        if opts.tenant_counts:
            log(f"{opts.tenant_counts} tenants at once")
            result["tenants"] = many_tenants(url, book, plans, opts)
        log("swap latency")
        quiet()
        result["swap_latency"] = swap_times(url, patch_dir, model_dir, key, opts)
        result["prefix_cache_hit_rate"] = matrix.hit_rates()
        result["same_output_text"] = sample_text(url, make("patch", user_prompt(10**6)))
    return result


def run_vllm(
    opts: Options, book: PromptBook, work: Path, model_dir: Path, plans: dict[int, tuple[int, int]], matrix: Matrix
) -> dict[str, object]:
    """``vllm_bare`` and ``client_embeds`` on vLLM's server with prompt embeddings on (no LoRA)."""
    embedder = ClientEmbedder(model_dir, [PREFIX_PATCH])

    def embeds_body(prompt: str) -> dict[str, object]:
        return {"model": MODEL_ID, "prompt_embeds": embedder.payload(messages(prompt)), **sampling(opts.max_tokens)}

    def make(variant: str, prompt: str) -> Call:
        if variant == "vllm_bare":
            return vllm_chat_call(MODEL_ID, prompt, opts.max_tokens)
        # Serialised when the segment's calls are built, before its clock starts (favours this variant).
        return Call("/v1/completions", json.dumps(embeds_body(prompt)).encode())

    with vllm_server(model_dir, opts, None, work / "vllm.log") as url:
        warm_up(url, ("vllm_bare", "client_embeds"), make, book)
        interleaved(matrix, url, ("vllm_bare", "client_embeds"), make, book, plans, opts)
        text = sample_text(url, Call("/v1/completions", embeds_body(user_prompt(10**6))))
    return {"same_output_text": text}


def run_lora(
    opts: Options, book: PromptBook, work: Path, model_dir: Path, plans: dict[int, tuple[int, int]], matrix: Matrix
) -> dict[str, object]:
    """``vllm_lora_bare`` and ``lora`` on vLLM's server with LoRA on."""
    supported, detail = lora_support()
    if not supported:
        return {"supported": False, "reason": detail}
    lora_dir = build_lora_adapter(model_dir, work / "lora16")
    names = {"vllm_lora_bare": MODEL_ID, "lora": LORA_NAME}

    def make(variant: str, prompt: str) -> Call:
        return vllm_chat_call(names[variant], prompt, opts.max_tokens)

    try:
        with vllm_server(model_dir, opts, lora_dir, work / "vllm-lora.log") as url:
            warm_up(url, tuple(names), make, book)
            interleaved(matrix, url, tuple(names), make, book, plans, opts)
    except RuntimeError as exc:  # the server refused LoRA on this backend: say so, invent nothing
        return {"supported": False, "reason": f"vLLM server with --enable-lora failed: {str(exc)[-600:]}"}
    return {"supported": True, "detail": detail, "adapter": str(lora_dir), "targets": "q,k,v,o,gate,up,down"}


# --- the run ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(parser)
    parser.add_argument("--repeats", type=int, help="interleaved segments per point (default 3)")
    parser.add_argument("--tenants", type=int, nargs="*", help="distinct tenant stacks at once (default 1 100 1000)")
    parser.add_argument("--memory-patches", type=int, help="extra patches loaded to measure memory (default 200)")
    parser.add_argument(
        "--api-torch-threads",
        type=int,
        help="experiment: torch.set_num_threads(N) in patchserve's API process (not a server setting)",
    )
    parser.add_argument(
        "--phases", nargs="+", choices=["patchserve", "vllm", "lora", "server"], help="phases to run (default all)"
    )
    args = parser.parse_args()
    opts = Options.quick() if args.quick else Options()
    apply_overrides(
        opts,
        args,
        repeats=args.repeats,
        tenant_counts=args.tenants,
        phases=args.phases,
        memory_patches=args.memory_patches,
    )
    opts.api_torch_threads = args.api_torch_threads
    out_dir = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="patchserve-overhead-"))
    log(f"work dir {work}; results to {out_dir}/")
    model_dir = prepare_default_model()
    book = PromptBook()
    started = time.monotonic()
    ps = run_patchserve(opts, book, work, model_dir) if "patchserve" in opts.phases else {}
    matrix: Matrix = ps.pop("matrix", None) or Matrix()
    plans = ps.get("segments_and_requests_per_point") or {c: point_plan(1.0, c, opts) for c in opts.concurrencies}
    vllm = lora = {}
    if "vllm" in opts.phases:
        log("vLLM server: vllm_bare, client_embeds")
        vllm = run_vllm(opts, book, work, model_dir, plans, matrix)
    if "lora" in opts.phases:
        log("vLLM server with LoRA: vllm_lora_bare, lora")
        lora = run_lora(opts, book, work, model_dir, plans, matrix)
    server: dict[str, object] = {}
    if "server" in opts.phases:
        log("server overhead: patchserve bare and vLLM's server bare, both up at once")
        server = server_overhead.run(opts, book, work, model_dir)
    figures = matrix.figures()
    baselines = {"lora": "vllm_lora_bare", "client_embeds": "vllm_bare"}
    unsupported = {"lora": lora["reason"]} if lora and not lora.get("supported") else None
    summary = build_summary(figures, baselines, unsupported)
    spreads = {
        v: {
            c: segment_throughput_ratios(matrix.segments[v][c], matrix.segments[baselines.get(v, "bare")][c])
            for c in by_c
        }
        for v, by_c in matrix.segments.items()
        if baselines.get(v, "bare") in matrix.segments
    }
    results = {
        "engine": "compiled" if opts.compiled else "eager (enforce_eager)",
        "patchserve_api_torch_threads": opts.api_torch_threads or "default",
        "options": asdict(opts),
        "duration_s": time.monotonic() - started,
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)},
        "baselines": {v: baselines.get(v, "bare") for v in figures},
        "figures": figures,
        "segment_throughput_ratios": spreads,
        "summary": summary,
        "patchserve": ps,
        "vllm": vllm,
        "lora": lora,
        "server_overhead": server,
        "prefix_cache_hit_rate": matrix.hit_rates(),
        "engine_breakdown": matrix.breakdown(),
        "foreign_cpu": matrix.foreign_cpu(),
    }
    if ps.get("same_output_text") and vllm.get("same_output_text"):
        # Both compute patch rows + the templated prompt: greedy text should agree (a check of the variant).
        results["client_embeds_matches_patch"] = ps["same_output_text"] == vllm["same_output_text"]
    results["targets"] = report.targets(results)
    (out_dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    (out_dir / "overhead.json").write_text(json.dumps(jsonable(results), indent=2))
    markdown = report.markdown(results)
    (out_dir / "overhead.md").write_text(markdown)
    report.plot(results, out_dir / "overhead.png")
    print(markdown)  # noqa: T201 - a benchmark's report
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; wrote {out_dir}/summary.json, overhead.json/.md/.png")


if __name__ == "__main__":
    main()
