"""Serve fairness patch files on a real server and evaluate their explicit gender bias (``make eval-bias``).

Two ``patchserve eval --mode bias`` runs against one server with a tenant ``bare`` (no patch) and one tenant
per patch file (pinned to its ``name@version``), comparing the bare model, the fairness system prompt
(``system_prompt``) and each patch, greedy answers:

* ``heldout``: the prompts of the templates ``patchserve train --task fairness`` keeps out (same split);
* ``external``: prompts from other sources, never trained on (WinoBias fill-in-the-blank, BBQ gender items).

With no ``--patch`` only the bare model and the system prompt are measured (the bare model's bias score).

Usage: ``python -m bench.bias_eval [--patch FILE ...] [--stack a@1+b@2 ...] [--out DIR] [--max-tokens 64]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bench.launch import add_stack_argument, eval_root, running_server, server_env
from bench.variants import DEMO_TRUST
from patches import biasprompts
from patches.basemodel import prepare_default_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, action="append", default=[], help="fairness patch file, repeatable")
    parser.add_argument("--trust", type=Path, default=DEMO_TRUST, help="public keys the patches are signed with")
    parser.add_argument("--out", type=Path, default=Path("var/eval/bias"), help="results: OUT/{heldout,external}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--winobias", type=int, default=120, help="WinoBias sentences (0: held-out templates only)")
    add_stack_argument(parser)
    parser.add_argument("--no-system-prompt", action="store_true", help="leave out the system-prompt baseline")
    args = parser.parse_args()

    written = biasprompts.write_sets(args.out / "prompts", n_winobias=args.winobias)  # before the server starts
    sets = {"heldout": args.out / "prompts" / "fairness_heldout.jsonl"}
    if args.winobias:
        sets["external"] = args.out / "prompts" / "bias_external.jsonl"
    print("prompts:", {str(p): n for p, n in written.items()})  # noqa: T201
    root, variants = eval_root("bias-eval-", args.patch, trust_from=args.trust, stacks=args.stack)
    system = [] if args.no_system_prompt else ["--system-prompt-variant", "system_prompt:bare:none"]
    env = server_env(root, prepare_default_model(), log_level="warning")
    with running_server(env, root / "server.log") as url:
        for name, file in sets.items():
            subprocess.run(
                [sys.executable, "-m", "patches.cli", "eval", "--mode", "bias", "--url", url,
                 *(arg for variant in variants for arg in ("--variant", variant)), *system,
                 "--prompts", str(file), "--max-tokens", str(args.max_tokens), "--out", str(args.out / name)],
                check=True, cwd=REPO,
            )  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
