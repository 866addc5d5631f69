"""Start a real patchserve process (or vLLM's own OpenAI server) on a free loopback port and wait until it is ready;
lay out its files (:func:`prepare_root`, and :func:`eval_root` for the evaluation benches' tenants)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from patches.format import read_patch
from patches.signing import generate_keypair, load_private_key

START_TIMEOUT_S = 600


def prepare_root(
    root: Path, tenants: list[dict], *, signer: str | None = None, trust_from: Path | None = None
) -> Ed25519PrivateKey | None:
    """Lay out a server's files under ``root``: ``tenants.yaml``, ``patches/``, and ``trust/`` holding the
    public keys of ``trust_from`` (e.g. the demo key the shipped patch is signed with) and, with ``signer``,
    of a fresh key pair (whose private key is returned)."""
    (root / "patches").mkdir(parents=True, exist_ok=True)
    (root / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    if trust_from is not None:
        (root / "trust").mkdir(exist_ok=True)
        for pub in trust_from.glob("*.pub"):
            (root / "trust" / pub.name).write_bytes(pub.read_bytes())
    if signer is None:
        return None
    private, public = generate_keypair(root / "keys", signer)
    (root / "trust").mkdir(exist_ok=True)
    (root / "trust" / public.name).write_bytes(public.read_bytes())
    return load_private_key(private)


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


def add_stack_argument(parser: argparse.ArgumentParser) -> None:
    """``--stack a@1+b@2`` (repeatable): the ``stacks`` of :func:`eval_root`."""
    parser.add_argument(
        "--stack", action="append", default=[], help="a stack of the given patches, 'a@1+b@2' (repeatable)"
    )


def eval_root(prefix: str, patches: list[Path], *, trust_from: Path, stacks: list[str] = ()) -> tuple[Path, list[str]]:
    """A fresh server root for an evaluation bench: :func:`tenants_for`'s tenants, each patch file copied in
    under its tenant's id; returns the root and the eval variants."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    tenants, variants = tenants_for(patches, stacks)
    prepare_root(root, tenants, trust_from=trust_from)
    for path, tenant in zip(patches, tenants[1 : 1 + len(patches)], strict=True):  # then the stack tenants
        shutil.copy(path, root / "patches" / f"{tenant['id']}.safetensors")
    return root, variants


def server_env(root: Path, model_dir: Path, **settings: object) -> dict[str, str]:
    """``PATCHSERVE_*`` variables for a server whose files live under ``root`` (see :func:`prepare_root`)."""
    env = {
        "model": model_dir,
        "patch_dir": root / "patches",
        "tenants_file": root / "tenants.yaml",
        "state_dir": root / "state",
        "enforce_eager": os.environ.get("PATCHSERVE_ENFORCE_EAGER", "true"),
        # No shadow replays (server/overhead.py): they would add engine work to patched requests only.
        "overhead_sample_rate": 0,
    }
    if (root / "trust").is_dir():
        env["trust_dir"] = root / "trust"
    return {f"PATCHSERVE_{k.upper()}": str(v) for k, v in {**env, **settings}.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str, process: subprocess.Popen, log_path: Path, timeout: float = START_TIMEOUT_S, path: str = "/readyz"
) -> None:
    """Poll ``path`` until 200; fail fast when the process dies or start-up fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            ready = httpx.get(f"{url}{path}", timeout=2)
        except httpx.TransportError:
            ready = None
        if ready is not None and ready.status_code == 200:
            return
        if ready is not None and "start-up failed" in ready.text:
            raise RuntimeError(f"server start-up failed: {ready.text}\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")


def write_result(name: str, result: object) -> Path:
    """Write ``$PATCHSERVE_BENCH_OUT/<name>.json`` (default folder ``bench-results/``) and print it."""
    out = Path(os.environ.get("PATCHSERVE_BENCH_OUT", "bench-results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))  # noqa: T201 - a benchmark's report
    return path


@contextmanager
def running_process(
    command: list[str], env: dict[str, str], log_path: Path, port: int, ready_path: str = "/readyz"
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``command`` (a server listening on ``port``) with ``env`` added; yields its base URL and process."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path, path=ready_path)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server_process(
    env: dict[str, str], log_path: Path, *, torch_threads: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``python -m server`` with ``env`` (``PATCHSERVE_*``) on a free port; yields its base URL and process.

    ``torch_threads`` (an experiment, not a server setting): ``torch.set_num_threads`` in the API server
    process before it starts; vLLM's engine processes are spawned and keep their own thread setting.
    """
    port = free_port()
    env = {**env, "PATCHSERVE_HOST": "127.0.0.1", "PATCHSERVE_PORT": str(port)}
    command = [sys.executable, "-m", "server"]
    if torch_threads is not None:
        code = f"import runpy, torch; torch.set_num_threads({int(torch_threads)}); "
        code += "runpy.run_module('server', run_name='__main__')"
        command = [sys.executable, "-c", code]
    with running_process(command, env, log_path, port) as (url, process):
        yield url, process


@contextmanager
def running_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run ``python -m server`` with ``env`` (``PATCHSERVE_*``) on a free port; yields its base URL."""
    with running_server_process(env, log_path) as (url, _):
        yield url


@contextmanager
def running_vllm_server(args: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``) with ``args`` on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, "--host", "127.0.0.1"]
    with running_process([*command, "--port", str(port)], {}, log_path, port, ready_path="/health") as running:
        yield running
