"""Where the time of a variant goes: py-spy samples of patchserve's API process and vLLM's engine core.

Starts the overhead benchmark's patchserve (same tenants and patches), warms it, then for each
variant runs closed-loop load for ``--seconds`` while ``py-spy record`` samples the API server
process and, separately, the engine-core process. Prints, per variant and process, the functions
with the most samples (self and inclusive), so variants can be compared line by line; the raw
collapsed stacks are kept in ``$PATCHSERVE_BENCH_OUT/profile/``.

Run: ``python -m bench.profile [--variants bare patch stack2] [--concurrency 8] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from bench.launch import running_server_process
from bench.loadgen import run_segment
from bench.segments import log
from bench.variants import PATCHSERVE_VARIANTS, patchserve_call, prepare_patchserve
from bench.workload import Options, PromptBook
from patches.basemodel import prepare_default_model


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Start ``py-spy record`` (raw collapsed stacks, non-blocking so the process is not paused)."""
    exe = Path(sys.executable).with_name("py-spy")
    command = [str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--nonblocking"]
    return subprocess.Popen(
        [*command, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def top_frames(collapsed: Path, n: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """Self and inclusive shares of the ``n`` busiest frames in a py-spy raw file, and its sample count."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames[1:]):  # the first frame is the thread
            inclusive[frame] += int(count)
    share = max(total, 1)
    return (
        [(f, c / share) for f, c in own.most_common(n)],
        [(f, c / share) for f, c in inclusive.most_common(n)],
        total,
    )


def engine_core(server: psutil.Process) -> psutil.Process | None:
    for child in server.children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    children = server.children(recursive=True)
    return max(children, key=lambda c: c.cpu_times().user, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(PATCHSERVE_VARIANTS), choices=PATCHSERVE_VARIANTS)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    opts = Options(tenant_counts=[], cold_pairs=0, max_tokens=args.max_tokens)
    out_dir = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results")) / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_default_model()
    root = Path(tempfile.mkdtemp(prefix="patchserve-profile-"))
    env, _ = prepare_patchserve(opts, root, model_dir)
    book = PromptBook()
    with running_server_process(env, root / "server.log") as (url, popen):
        server = psutil.Process(popen.pid)
        core = engine_core(server)
        for variant in args.variants:  # warm every variant's prefix cache first
            run_segment(url, [patchserve_call(variant, p, 8) for p in book.get(("warm", variant), 16)], 8)
        for variant in args.variants:
            c = args.concurrency
            probe = run_segment(
                url, [patchserve_call(variant, p, args.max_tokens) for p in book.get(("p", variant), c)], c
            )
            n = c * (math.ceil((args.seconds + 4) / probe.wall) + 1)  # outlasts the recording
            calls = [patchserve_call(variant, p, args.max_tokens) for p in book.get(("run", variant), n)]
            files = {"api": out_dir / f"{variant}-c{c}-api.txt", "engine": out_dir / f"{variant}-c{c}-engine.txt"}
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(run_segment, url, calls, c)
                time.sleep(2)
                spies = [py_spy(server.pid, args.seconds, files["api"])]
                if core is not None:
                    spies.append(py_spy(core.pid, args.seconds, files["engine"]))
                for spy in spies:
                    spy.wait(timeout=args.seconds + 60)
                segment = load.result()
            log(f"{variant} c={c}: {segment.tokens / segment.wall:.1f} tok/s over {len(segment.samples)} requests")
            for process, path in files.items():
                if not path.is_file():
                    continue
                own, inclusive, total = top_frames(path, args.top)
                print(f"\n== {variant}, {process} process: {total} samples; self time")  # noqa: T201
                for frame, share in own:
                    print(f"  {share:6.1%}  {frame}")  # noqa: T201
                print(f"== {variant}, {process} process: inclusive")  # noqa: T201
                for frame, share in inclusive:
                    print(f"  {share:6.1%}  {frame}")  # noqa: T201


if __name__ == "__main__":
    main()
