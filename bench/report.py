"""The overhead benchmark's report: target checks, markdown tables and the PNG plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bench import server_overhead
from bench.stats import RATIO_KEYS, check_target, throughput_overhead

LABELS = {
    "bare": "bare model",
    "patch": "one 50-token patch (the shipped one)",
    "suffix": "one 50-token suffix patch",
    "stack2": "two-patch stack (50 + 50)",
    "text_prompt": "safety system prompt (~50 tokens)",
    "vllm_bare": "vLLM server, bare (baseline of client_embeds)",
    "client_embeds": "vLLM server, client-side prompt embeddings",
    "vllm_lora_bare": "vLLM server + LoRA enabled, bare (baseline of lora)",
    "lora": "vLLM server, rank-16 LoRA",
}
ORDER = ["bare", "patch", "suffix", "stack2", "text_prompt", "vllm_bare", "client_embeds", "vllm_lora_bare", "lora"]


def _cell(summary: dict, variant: str, c: int | str) -> dict | None:
    entry = summary.get(variant)
    if not isinstance(entry, dict) or entry.get("supported") is False:
        return None
    return entry.get(str(c))


def targets(results: dict) -> list[dict[str, object]]:
    """The issue's targets, per concurrency, from the run's summary and figures."""
    summary, figures = results["summary"], results["figures"]
    lines: list[dict[str, object]] = []
    concurrencies = sorted({int(c) for by_c in figures.values() for c in by_c})
    for c in concurrencies:
        for variant, bound in (("patch", 0.01), ("stack2", 0.02)):
            cell = _cell(summary, variant, c)
            if cell is None:
                continue
            lines.append(
                check_target(f"{variant} throughput, c={c}", cell["throughput_ratio"], ">=", 1 - bound, "vs bare")
            )
            lines.append(check_target(f"{variant} TTFT p50, c={c}", cell["ttft_p50_ratio"], "<=", 1 + bound, "vs bare"))
        patch, lora = _cell(summary, "patch", c), _cell(summary, "lora", c)
        if patch and lora:
            for what, key in (("e2e p50 latency", "e2e_p50_ratio"), ("throughput", "throughput_ratio")):
                if key == "throughput_ratio":
                    p_cost, l_cost = throughput_overhead(patch[key]), throughput_overhead(lora[key])
                else:
                    p_cost, l_cost = patch[key] - 1, lora[key] - 1
                # How many times the patch's overhead fits into LoRA's (infinite when the patch costs nothing).
                times = l_cost / p_cost if p_cost > 0 else math.inf
                note = f"patch {p_cost:+.1%}, lora {l_cost:+.1%} (each vs its own server's bare)"
                lines.append(check_target(f"LoRA overhead / patch overhead ({what}), c={c}", times, ">=", 10, note))
        embeds = figures.get("client_embeds", {}).get(c) or figures.get("client_embeds", {}).get(str(c))
        patch_fig = figures.get("patch", {}).get(c) or figures.get("patch", {}).get(str(c))
        if embeds and patch_fig:
            times = patch_fig["throughput_tok_s"] / embeds["throughput_tok_s"]
            note = f"{patch_fig['throughput_tok_s']:.0f} vs {embeds['throughput_tok_s']:.0f} tok/s (absolute)"
            lines.append(check_target(f"patch / client_embeds throughput, c={c}", times, ">=", 1.2, note))
    return lines + list((results.get("server_overhead") or {}).get("targets") or [])


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f" ({value:.3f})"


def main_table(results: dict) -> str:
    figures, summary = results["figures"], results["summary"]
    baselines = results["baselines"]
    rows = [
        "| variant | c | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | e2e p50 ms | e2e p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    concurrencies = sorted({int(c) for by_c in figures.values() for c in by_c})
    for c in concurrencies:
        for variant in ORDER:
            fig = figures.get(variant, {}).get(c) or figures.get(variant, {}).get(str(c))
            if fig is None:
                continue
            base = figures.get(baselines.get(variant, "bare"), {}).get(c)
            cell = _cell(summary, variant, c) or ({k: fig[f] / base[f] for f, k in RATIO_KEYS.items()} if base else {})
            rows.append(
                f"| {LABELS.get(variant, variant)} | {c} "
                f"| {_fmt(fig['throughput_tok_s'])}{_ratio(cell.get('throughput_ratio'))} "
                f"| {_fmt(fig['ttft_p50_ms'])}{_ratio(cell.get('ttft_p50_ratio'))} "
                f"| {_fmt(fig['ttft_p99_ms'])}{_ratio(cell.get('ttft_p99_ratio'))} "
                f"| {_fmt(fig['itl_p50_ms'], '.1f')}{_ratio(cell.get('itl_p50_ratio'))} "
                f"| {_fmt(fig['e2e_p50_ms'])}{_ratio(cell.get('e2e_p50_ratio'))} "
                f"| {_fmt(fig['e2e_p99_ms'])}{_ratio(cell.get('e2e_p99_ratio'))} |"
            )
    return "\n".join(rows)


def markdown(results: dict) -> str:
    """Every table of the run, as markdown."""
    opts = results["options"]
    parts = [
        f"Engine: **{results['engine']}**; {results['machine']['cpus']} CPUs, {results['machine']['ram_gb']} GB RAM; "
        f"{opts['max_tokens']} output tokens per request (greedy, EOS ignored, streamed); "
        f"{opts['repeats']} interleaved segments per point; run took {results['duration_s'] / 60:.1f} min.",
        "",
        "Ratios in parentheses are to the bare model measured in the same run: patchserve's bare tenant for "
        "patchserve variants, the bare model on the same vLLM server for `client_embeds` and `lora`.",
        "",
        main_table(results),
    ]
    if (threads := results.get("patchserve_api_torch_threads", "default")) != "default":
        parts.insert(1, f"\nExperiment: patchserve's API process ran with `torch.set_num_threads({threads})`.")
    if foreign := results.get("foreign_cpu"):
        flagged = foreign.get("flagged") or []
        parts += [
            "",
            f"Other processes on the machine took {foreign['mean']:.1%} of the CPU on average during the kept "
            f"segments (max {foreign['max']:.1%}); "
            + (f"segments still above 10%: {'; '.join(flagged)}." if flagged else "no kept segment above 10%.")
            + (
                f" Re-run because other processes took the CPU: {'; '.join(reruns)}."
                if (reruns := foreign.get("reruns"))
                else ""
            ),
        ]
    spreads = results.get("segment_throughput_ratios") or {}
    if spreads:
        parts += ["", "Throughput ratio of each interleaved segment on its own (the run's noise):", ""]
        for variant in ORDER:
            for c, values in sorted((spreads.get(variant) or {}).items(), key=lambda kv: int(kv[0])):
                if variant in ("bare", "vllm_bare", "vllm_lora_bare") or not values:
                    continue
                if len(values) <= 6:
                    parts.append(f"* {variant}, c={c}: " + ", ".join(f"{v:.3f}" for v in values))
                else:
                    sd = statistics.stdev(values)
                    parts.append(
                        f"* {variant}, c={c}: {len(values)} segments, mean {statistics.mean(values):.3f}, "
                        f"sd {sd:.3f} (standard error of the mean {sd / len(values) ** 0.5:.3f})"
                    )
    if breakdown := results.get("engine_breakdown"):
        parts += [
            "",
            "Where the time goes, by vLLM's own clocks (means per request; *outside engine* = the client's mean "
            "end-to-end minus the engine's: HTTP, the API server, patchserve's own work):",
            "",
            "| variant | c | queue ms | prefill ms | decode ms | engine e2e ms | outside engine ms "
            "| prompt tok | prefill computed tok | prefix-cache hits |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in ORDER:
            for c, b in sorted((breakdown.get(variant) or {}).items(), key=lambda kv: int(kv[0])):
                parts.append(
                    f"| {variant} | {c} | {b['engine_queue_ms']:.0f} | {b['engine_prefill_ms']:.1f} "
                    f"| {b['engine_decode_ms']:.0f} | {b['engine_e2e_ms']:.0f} | {b['outside_engine_ms']:.1f} "
                    f"| {b['prompt_tokens']:.0f} | {b['prefill_computed_tokens']:.0f} "
                    f"| {_fmt(b['prefix_cache_hit_rate'], '.0%')} |"
                )
    ps = results.get("patchserve") or {}
    figures = results["figures"]
    if "vllm_bare" in figures and "bare" in figures:
        parts += ["", "| bare model on | c | output tok/s | TTFT p50 ms | e2e p50 ms |", "|---|---|---|---|---|"]
        for c in sorted(figures["bare"], key=int):
            for variant, where in (
                ("bare", "patchserve"),
                ("vllm_bare", "vLLM server"),
                ("vllm_lora_bare", "vLLM server + LoRA enabled"),
            ):
                fig = figures.get(variant, {}).get(c)
                if fig:
                    tput, ttft, e2e = fig["throughput_tok_s"], fig["ttft_p50_ms"], fig["e2e_p50_ms"]
                    parts.append(f"| {where} | {c} | {tput:.0f} | {ttft:.0f} | {e2e:.0f} |")
    if cold := ps.get("cold_vs_warm"):
        parts += [
            "",
            "Cold vs warm prefix cache (sequential requests; a tenant's first request computes its patch rows):",
            "",
            "| request | TTFT p50 ms | TTFT p99 ms | e2e p50 ms |",
            "|---|---|---|---|",
        ]
        for kind, label in (("cold", "patch, cold (tenant's first)"), ("warm", "patch, warm"), ("bare", "bare")):
            row = cold[kind]
            parts.append(f"| {label} | {row['ttft_p50_ms']:.1f} | {row['ttft_p99_ms']:.1f} | {row['e2e_p50_ms']:.0f} |")
    if tenants := ps.get("tenants"):
        parts += [
            "",
            f"Distinct tenant stacks active at once (c={tenants['concurrency']}, requests spread round-robin; "
            "each tenant's stack has its own cache salt):",
            "",
            "| tenants | output tok/s | TTFT p50 ms | e2e p50 ms | prefix-cache hit rate |",
            "|---|---|---|---|---|",
        ]
        for name, entry in tenants.items():
            if name != "bare" and not name.startswith("tenants_"):
                continue
            label = "bare" if name == "bare" else name.split("_")[1]
            hit = entry.get("prefix_cache_hit_rate")
            parts.append(
                f"| {label} | {entry['throughput_tok_s']:.0f}{_ratio(entry['throughput_ratio'])} "
                f"| {entry['ttft_p50_ms']:.0f}{_ratio(entry['ttft_p50_ratio'])} | {entry['e2e_p50_ms']:.0f} "
                f"| {_fmt(hit, '.1%') if hit is not None else '–'} |"
            )
    if swap := ps.get("swap_latency"):
        parts += ["", "| swap path | p50 ms | p99 ms | max ms |", "|---|---|---|---|"]
        for key, label in (
            ("one_token_request", "one-token request alone (the floor)"),
            ("admin_swap_to_first_response", "admin upload → first response with the new version"),
            ("file_drop_to_first_response", "file drop → first response with the new version"),
        ):
            parts.append(
                f"| {label} | {swap[key]['p50_ms']:.0f} | {swap[key]['p99_ms']:.0f} | {swap[key]['max_ms']:.0f} |"
            )
    if mem := ps.get("memory"):
        parts += [
            "",
            f"Memory: {mem['patches']} more patches loaded raised the server's RSS by "
            f"**{mem['rss_per_patch_kb']:.0f} KiB per patch** ({mem['rss_tree_per_patch_kb']:.0f} KiB with the engine "
            f"process); a {mem['rows'][0]}x{mem['rows'][1]} patch file ({mem['file_dtype']}) is "
            f"{mem['file_kb']:.0f} KiB, "
            f"its rows in bf16 {mem['rows_bf16_kb']:.0f} KiB.",
        ]
    if (match := results.get("client_embeds_matches_patch")) is not None:
        parts += [
            "",
            "`client_embeds` sends the same input as patchserve's `patch` (patch rows + the templated prompt); "
            f"same greedy text from both servers: **{'yes' if match else 'no'}**.",
        ]
    if rows := (results.get("server_overhead") or {}).get("rows"):
        parts += [
            "",
            "Server overhead: patchserve's bare tenant vs vLLM's own OpenAI server, same engine arguments, both up "
            "at once, segments interleaved (throughput ratio > 1: patchserve faster):",
            "",
            server_overhead.markdown(rows),
        ]
    if (lora := results.get("lora")) and lora.get("supported") is False:
        parts += ["", f"LoRA: **not supported here** — {lora['reason']}"]
    if lines := results.get("targets"):
        parts += ["", "| target | value | bound | met | |", "|---|---|---|---|---|"]
        for t in lines:
            value = t["value"]
            shown = "∞" if isinstance(value, float) and math.isinf(value) else f"{value:.3f}"
            met = "yes" if t["met"] else "**no**"
            parts.append(f"| {t['target']} | {shown} | {t['op']} {t['bound']} | {met} | {t['note']} |")
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Bars of the throughput, TTFT p50 and e2e p50 ratios per variant and concurrency, and absolute tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures, summary = results["figures"], results["summary"]
    variants = [v for v in ORDER if v in figures and v not in ("bare", "vllm_bare", "vllm_lora_bare")]
    concurrencies = sorted({int(c) for by_c in figures.values() for c in by_c})
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    width = 0.8 / max(len(concurrencies), 1)
    panels = [
        (axes[0][0], "throughput_ratio", "output tokens/s vs bare (higher is better)"),
        (axes[0][1], "ttft_p50_ratio", "TTFT p50 vs bare (lower is better)"),
        (axes[1][0], "e2e_p50_ratio", "end-to-end p50 vs bare (lower is better)"),
    ]
    for ax, key, title in panels:
        for i, c in enumerate(concurrencies):
            values = [(_cell(summary, v, c) or {}).get(key, math.nan) for v in variants]
            ax.bar([x + i * width for x in range(len(variants))], values, width, label=f"c={c}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(concurrencies) - 1) / 2 for x in range(len(variants))], variants, rotation=20)
        ax.set_title(title)
        ax.legend()
    ax = axes[1][1]
    absolute = [v for v in ORDER if v in figures]
    for i, c in enumerate(concurrencies):
        values = [(figures[v].get(c) or {}).get("throughput_tok_s", math.nan) for v in absolute]
        ax.bar([x + i * width for x in range(len(absolute))], values, width, label=f"c={c}")
    ax.set_xticks([x + width * (len(concurrencies) - 1) / 2 for x in range(len(absolute))], absolute, rotation=30)
    ax.set_title("output tokens/s (absolute)")
    ax.legend()
    fig.suptitle(f"patchserve overhead benchmark ({results['engine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
