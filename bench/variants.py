"""The overhead benchmark's variants: their requests, and the servers (patchserve, vLLM's own) behind them.

The patchserve variants (``bare``, ``patch``, ``suffix``, ``stack2``, ``text_prompt``) are tenants of one
bench server (:func:`prepare_patchserve`: the shipped ``refusal`` patch, a second ``guard`` patch, a 50-row
suffix patch ``guard-suffix``, the ``hot``
patch that swap latency replaces, and the tenants of every phase); the vLLM variants run on vLLM's own
OpenAI server (:func:`vllm_server`, with or without LoRA). :func:`patchserve_call` and
:func:`vllm_chat_call` build one greedy request of a variant (streamed unless ``stream=False``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.alternatives import LORA_NAME
from bench.launch import prepare_root, running_vllm_server, server_env
from bench.loadgen import Call
from bench.segments import log
from bench.swap_latency import ADMIN_TOKEN
from bench.workload import Options
from patches.demo import text_patch
from patches.evaluate import SAFETY_SYSTEM_PROMPT
from patches.format import read_patch, write_atomic
from patches.stack import Placement

REPO = Path(__file__).resolve().parent.parent


def _shipped_patch(directory: Path = REPO / "deploy/demo/patches", placement: Placement | None = None) -> Path:
    """The highest shipped ``refusal`` version in ``deploy/demo/patches`` (v10 sorts after v9), of ``placement``
    when given."""
    files = sorted(directory.glob("refusal-v*.safetensors"), key=lambda f: int(f.stem.rsplit("-v", 1)[1]))
    if placement is not None:
        files = [f for f in files if read_patch(f.read_bytes())[0].placement == placement]
    if not files:
        raise FileNotFoundError(f"no {placement or ''} refusal-v*.safetensors in {directory}")
    return files[-1]


SHIPPED_PATCH = _shipped_patch()  # what demo-patched serves, and `make eval`'s default
# The overhead bench's ``patch`` variant: a trained *prefix* patch, whose rows the prefix cache can hold
# (the ``suffix`` variant measures the other placement).
PREFIX_PATCH = _shipped_patch(placement=Placement.prefix)
DEMO_TRUST = REPO / "deploy/demo/trust"
MODEL_ID = "base"
PATCHSERVE_VARIANTS = ("bare", "patch", "suffix", "stack2", "text_prompt")
TENANT_OF = {
    "bare": "bench-bare",
    "patch": "bench-patch",
    "suffix": "bench-suffix",
    "stack2": "bench-stack2",
    "text_prompt": "bench-bare",
}
GUARD_TEXT = "Be careful: decline to help with anything dangerous, illegal or hateful, and stay kind and honest."


def messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "user", "content": prompt}]
    return [{"role": "system", "content": system}, *out] if system else out


def sampling(max_tokens: int, stream: bool = True) -> dict[str, object]:
    """Greedy, exactly ``max_tokens`` (EOS ignored); streamed with a final usage frame, or one JSON answer."""
    body: dict[str, object] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def patchserve_call(
    variant: str, prompt: str, max_tokens: int, tenant: str | None = None, *, stream: bool = True
) -> Call:
    system = SAFETY_SYSTEM_PROMPT if variant == "text_prompt" else None
    body = {"model": MODEL_ID, "messages": messages(prompt, system), **sampling(max_tokens, stream)}
    return Call("/v1/chat/completions", body, {"X-Tenant-Id": tenant or TENANT_OF[variant]})


def vllm_chat_call(model: str, prompt: str, max_tokens: int, *, stream: bool = True) -> Call:
    body = {"model": model, "messages": messages(prompt), **sampling(max_tokens, stream)}
    return Call("/v1/chat/completions", body)


PATCHED = {"default_stack": ["refusal"], "allowed_patches": ["refusal"]}


def tenants_file(opts: Options) -> list[dict]:
    tenants = [
        {"id": "bench-bare", "allow_unpatched": True},
        {"id": "bench-patch", **PATCHED},
        {"id": "bench-stack2", "default_stack": ["refusal", "guard"], "allowed_patches": ["refusal", "guard"]},
        {"id": "bench-suffix", "default_stack": ["guard-suffix"], "allowed_patches": ["guard-suffix"]},
        {"id": "hot", "default_stack": ["hot"], "allowed_patches": ["hot"]},
    ]
    tenants += [{"id": f"cold-{k:04d}", **PATCHED} for k in range(opts.cold_pairs)]
    tenants += [{"id": f"t-{k:04d}", **PATCHED} for k in range(max(opts.tenant_counts, default=0))]
    return tenants


def prepare_patchserve(opts: Options, root: Path, model_dir: Path) -> tuple[dict[str, str], Ed25519PrivateKey]:
    """The bench server's files under ``root`` (tenants, the shipped patch, ``guard``, ``hot``); its env and key."""
    key = prepare_root(root, tenants_file(opts), signer="bench", trust_from=DEMO_TRUST)  # the shipped patch's key
    assert key is not None
    patch_dir = root / "patches"
    shutil.copy(PREFIX_PATCH, patch_dir / PREFIX_PATCH.name)
    guard = text_patch(model_dir, "guard", text=GUARD_TEXT, n_tokens=50, key=key)
    write_atomic(patch_dir / "guard.safetensors", guard)
    # 50 rows after the prompt: never a prefix-cache hit, whatever their values (what placement costs)
    guard_suffix = text_patch(
        model_dir, "guard-suffix", text=GUARD_TEXT, n_tokens=50, key=key, placement=Placement.suffix
    )
    write_atomic(patch_dir / "guard-suffix.safetensors", guard_suffix)
    write_atomic(patch_dir / "hot.safetensors", text_patch(model_dir, "hot", version=1, key=key))
    settings = {
        "admin_token": ADMIN_TOKEN,
        "enforce_eager": str(not opts.compiled).lower(),
        "log_level": "warning",
        "overhead_sample_rate": 0,  # shadow replays would add ~2% work to the patched variants only
        "served_model_name": MODEL_ID,  # the requests' "model": patchserve refuses a model it does not serve
    }
    return server_env(root, model_dir, **settings), key


def sample_text(url: str, call: Call) -> str:
    """The non-streamed answer to ``call`` (to check that two servers compute the same thing)."""
    body = {**call.body, "stream": False, "max_tokens": 24}  # type: ignore[dict-item]
    body.pop("stream_options", None)
    response = httpx.post(url + call.path, json=body, headers=call.headers, timeout=120)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


# The engine arguments of vLLM's own server in every phase; patchserve's defaults are the same
# (``server.settings.Settings``), and bench.server_overhead sets them on patchserve explicitly too.
ENGINE = {"dtype": "bfloat16", "block_size": 32, "max_model_len": 2048, "max_num_seqs": 64}
MEMORY_SHARE = 0.3  # gpu_memory_utilization (of RAM, on CPU) when one engine runs at a time


def engine_args(memory_share: float = MEMORY_SHARE) -> dict[str, object]:
    """:data:`ENGINE` with a ``gpu_memory_utilization``: one engine's arguments, by setting name."""
    return {**ENGINE, "gpu_memory_utilization": memory_share}


def vllm_args(model_dir: Path, opts: Options, lora_dir: Path | None, memory_share: float = MEMORY_SHARE) -> list[str]:
    args = ["--model", str(model_dir), "--served-model-name", MODEL_ID]
    for name, value in engine_args(memory_share).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    args += [
        "--enable-prefix-caching",
        "--enable-prompt-embeds",
        "--uvicorn-log-level",
        "warning",
        "--disable-uvicorn-access-log",
    ]
    if not opts.compiled:
        args.append("--enforce-eager")
    if lora_dir is not None:
        args += [
            "--enable-lora",
            "--max-lora-rank",
            "16",
            "--max-loras",
            "1",
            "--lora-modules",
            f"{LORA_NAME}={lora_dir}",
        ]
    return args


@contextmanager
def vllm_server_process(
    model_dir: Path, opts: Options, lora_dir: Path | None, log_path: Path, memory_share: float = MEMORY_SHARE
) -> Iterator[tuple[str, subprocess.Popen]]:
    """vLLM's own OpenAI server with :data:`ENGINE` (eager unless ``opts.compiled``); its URL and process."""
    started = time.monotonic()
    with running_vllm_server(vllm_args(model_dir, opts, lora_dir, memory_share), log_path) as (url, process):
        log(f"vLLM server ready in {time.monotonic() - started:.0f}s ({url})")
        yield url, process


@contextmanager
def vllm_server(model_dir: Path, opts: Options, lora_dir: Path | None, log_path: Path) -> Iterator[str]:
    with vllm_server_process(model_dir, opts, lora_dir, log_path) as (url, _):
        yield url
