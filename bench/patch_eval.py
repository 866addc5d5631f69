"""Serve a patch file on a real server and evaluate it (``make eval``): held-out split and other sources.

Two ``patchserve eval`` runs against one server with a tenant ``bare`` (no patch) and one tenant per patch
file under test (pinned to its ``name@version``), comparing the bare model, the textual safety system
prompt and each patch:

* ``heldout``: the training sources' held-out prompts (the same hash split ``patchserve train`` keeps
  out), tagged by file, so sets added later are reported apart from the ones before them;
* ``external``: prompt sets from other sources, never trained on (``patches/evalsets.py``).

Usage: ``python -m bench.patch_eval [--patch FILE ...] [--stack a@1+b@2 ...] [--out DIR]`` (a stack of the
given patch files is one more variant: the refusal columns of a stack's interference row).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from bench.launch import add_stack_argument, eval_root, running_server, server_env
from bench.variants import DEMO_TRUST, SHIPPED_PATCH
from patches import evalsets
from patches.basemodel import default_cache_dir, prepare_default_model
from patches.evaluate import EvalPrompt
from patches.train.config import TrainConfig
from patches.train.data import load_split

REPO = Path(__file__).resolve().parents[1]


def heldout_prompts(config: TrainConfig) -> list[EvalPrompt]:
    """The prompts ``patchserve train`` keeps out of training, tagged with their file."""
    _, heldout = load_split(config.harmful, config.benign, config.holdout)
    return [EvalPrompt(p.text, p.harmful, p.source) for p in heldout]


def _per_set(prompts: list[EvalPrompt], n: int) -> list[EvalPrompt]:
    """At most ``n`` prompts of each source: the ones with the smallest content hash (same on every machine)."""
    out: list[EvalPrompt] = []
    for source in dict.fromkeys(p.source for p in prompts):
        group = [p for p in prompts if p.source == source]
        out += sorted(group, key=lambda p: hashlib.sha256(p.text.encode()).digest())[:n]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, action="append", help="patch file, repeatable (default: the shipped)")
    parser.add_argument("--trust", type=Path, default=DEMO_TRUST, help="public keys")
    parser.add_argument("--out", type=Path, default=Path("var/eval"), help="results go to OUT/{heldout,external}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-set", type=int, help="at most this many prompts per set (fixed sample; quick runs)")
    parser.add_argument("--skip", choices=["heldout", "external"], action="append", default=[])
    add_stack_argument(parser)
    args = parser.parse_args()

    sets: dict[str, list[EvalPrompt]] = {}  # built before the server starts: a failed download costs no start
    if "heldout" not in args.skip:
        sets["heldout"] = heldout_prompts(TrainConfig())
    if "external" not in args.skip:
        sets["external"] = evalsets.build(default_cache_dir() / "eval-sets")
    if args.per_set:
        sets = {name: _per_set(prompts, args.per_set) for name, prompts in sets.items()}
    root, variants = eval_root("patch-eval-", args.patch or [SHIPPED_PATCH], trust_from=args.trust, stacks=args.stack)
    env = server_env(root, prepare_default_model(), log_level="warning")
    with running_server(env, root / "server.log") as url:
        for name, prompts in sets.items():
            file = evalsets.write_jsonl(prompts, args.out / name / "prompts.jsonl")
            subprocess.run(
                [sys.executable, "-m", "patches.cli", "eval", "--url", url,
                 *(arg for variant in variants for arg in ("--variant", variant)),
                 "--system-prompt-variant", "system_prompt:bare:none", "--prompts", str(file),
                 "--max-tokens", str(args.max_tokens), "--out", str(args.out / name)],
                check=True, cwd=REPO,
            )  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
