"""PEFT interop: PEFT prompt-tuning adapters to format-v1 patches and back, rows bit for bit.

A PEFT prompt-tuning adapter (``peft_type`` ``PROMPT_TUNING``, task ``CAUSAL_LM``) is a directory with
``adapter_config.json`` and ``adapter_model.safetensors``, whose one tensor ``prompt_embeddings`` has shape
``[num_virtual_tokens, token_dim]``. PEFT puts those rows before the embeddings of every input token. That is
patchserve's layout for one prefix patch (see :mod:`patches.stack`): the rows, then the chat-templated prompt.
So the two formats hold the same thing, and the rows are copied without a cast.

Import (:func:`read_adapter`, then :func:`adapter_to_patch`) checks, in this order:

* the directory: ``adapter_config.json``, then ``adapter_model.safetensors`` (a pickle-only
  ``adapter_model.bin`` is never loaded) of at most :data:`~patches.format.MAX_FILE_BYTES` (``bad_format``,
  ``oversized``);
* the method: ``peft_type`` must be ``PROMPT_TUNING`` for a causal LM, with one transformer submodule and no
  ``modules_to_save``. Anything else PEFT can save (LoRA, prefix tuning, P-tuning, ...) raises
  :class:`~patches.errors.ConversionError` naming what was found;
* shapes: the tensor is ``num_virtual_tokens x token_dim`` (``bad_shape``), and ``token_dim`` equals the
  model's hidden size (``bad_shape``);
* the base model (``wrong_model``), see :func:`check_base_model`;
* every check of :func:`patches.format.parse_patch` on the finished file.

Export (:func:`patch_to_adapter`, then :func:`write_adapter`) takes prefix patches only. A suffix patch's
rows come after the prompt, and PEFT can only prepend, so it raises :class:`~patches.errors.ConversionError`.
A stack of several patches (with separator tokens between them) has no PEFT equivalent either, so one file
is exported at a time. The adapter's safetensors metadata records the patch's fingerprint, ref and content
digest under ``patchserve.*`` keys. PEFT ignores them; an import checks the fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import PeftConfig, PeftType, PromptTuningConfig, TaskType
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from safetensors import safe_open
from safetensors.torch import save as st_save

from patches.errors import ConversionError, PatchRejected, RejectReason
from patches.fingerprint import ModelSpec, fingerprint_model
from patches.format import (
    MAX_FILE_BYTES,
    PatchMetadata,
    dump_patch,
    parse_patch,
    read_patch,
    read_regular_file,
    write_atomic,
)
from patches.signing import sign_patch
from patches.stack import Placement

PEFT_TENSOR_KEY = "prompt_embeddings"  # the key PEFT's get_peft_model_state_dict uses for prompt learning
BASE_MODEL_KEY = "patchserve.base_model"
PATCH_REF_KEY = "patchserve.patch"
DIGEST_KEY = "patchserve.content_digest"

# Why the PEFT methods closest to prompt tuning are not patches (any other: "not a soft prompt").
_UNSUPPORTED = {
    PeftType.PREFIX_TUNING.value: "per-layer key/value prefixes, not input embeddings",
    PeftType.P_TUNING.value: "virtual tokens computed by a prompt encoder (MLP/LSTM), not stored rows",
    PeftType.MULTITASK_PROMPT_TUNING.value: "per-task prompts composed from shared matrices",
    PeftType.ADAPTION_PROMPT.value: "prompts injected into attention layers, not input embeddings",
    PeftType.LORA.value: "low-rank updates of the model's weights, not virtual tokens",
}


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT prompt-tuning adapter in memory.

    Attributes:
        config: PEFT's own config object (what ``adapter_config.json`` holds).
        rows: ``[num_virtual_tokens, token_dim]`` in the dtype it was stored in.
        metadata: The safetensors metadata of ``adapter_model.safetensors`` (``format`` plus, for an
            adapter exported by patchserve, the ``patchserve.*`` keys).
    """

    config: PromptTuningConfig
    rows: torch.Tensor
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})


def _read_config(adapter_dir: Path) -> PromptTuningConfig:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():  # checked first: PEFT would otherwise look the name up on the Hub
        raise PatchRejected(RejectReason.bad_format, f"{adapter_dir.name} has no {CONFIG_NAME}: not a PEFT adapter")
    try:
        raw = json.loads(read_regular_file(path))
    except ValueError as exc:
        raise PatchRejected(RejectReason.bad_format, f"{CONFIG_NAME} is not valid JSON") from exc
    found = raw.get("peft_type") if isinstance(raw, dict) else None
    if found != PeftType.PROMPT_TUNING:
        why = _UNSUPPORTED.get(str(found), "not a soft prompt")
        raise ConversionError(
            f"adapter is peft_type {found!r} ({why}); only PROMPT_TUNING adapters, whose virtual tokens are "
            "prepended to the input embeddings, convert to patches"
        )
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError) as exc:
        raise PatchRejected(RejectReason.bad_format, f"{CONFIG_NAME} is not a valid PromptTuningConfig: {exc}") from exc
    if not isinstance(config, PromptTuningConfig):
        raise PatchRejected(RejectReason.bad_format, f"{CONFIG_NAME} loads as {type(config).__name__}")
    if config.task_type != TaskType.CAUSAL_LM:
        task = getattr(config.task_type, "value", config.task_type)
        raise ConversionError(f"adapter task_type is {task!r}; patchserve serves causal LMs (CAUSAL_LM)")
    if config.num_transformer_submodules not in (None, 1):
        raise ConversionError(
            f"adapter has {config.num_transformer_submodules} transformer submodules (encoder-decoder); "
            "a patch has one set of rows for a decoder-only model"
        )
    if config.modules_to_save:
        raise ConversionError(
            f"adapter also trains modules {sorted(config.modules_to_save)}; a patch holds virtual tokens only"
        )
    return config


def _read_rows(adapter_dir: Path, config: PromptTuningConfig) -> tuple[torch.Tensor, dict[str, str]]:
    path = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        found = f"only {WEIGHTS_NAME} (pickle, never loaded)" if (adapter_dir / WEIGHTS_NAME).exists() else "none"
        raise PatchRejected(
            RejectReason.bad_format,
            f"adapter has no {SAFETENSORS_WEIGHTS_NAME} (found {found}); save it with safe_serialization=True",
        )
    if path.stat().st_size > MAX_FILE_BYTES:
        raise PatchRejected(RejectReason.oversized, f"{SAFETENSORS_WEIGHTS_NAME} exceeds {MAX_FILE_BYTES} bytes")
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")  # the safetensors file, checked above
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise PatchRejected(RejectReason.bad_format, f"{SAFETENSORS_WEIGHTS_NAME} cannot be read: {exc}") from exc
    if list(weights) != [PEFT_TENSOR_KEY]:
        raise PatchRejected(
            RejectReason.bad_format,
            f"{SAFETENSORS_WEIGHTS_NAME} must hold exactly {PEFT_TENSOR_KEY!r}, found {sorted(weights)}",
        )
    rows = weights[PEFT_TENSOR_KEY]
    expected = [config.num_virtual_tokens * (config.num_transformer_submodules or 1), config.token_dim]
    if list(rows.shape) != expected:
        raise PatchRejected(
            RejectReason.bad_shape,
            f"{PEFT_TENSOR_KEY} has shape {list(rows.shape)}, but the config says num_virtual_tokens "
            f"{config.num_virtual_tokens} x token_dim {config.token_dim}",
        )
    return rows, metadata


def read_adapter(adapter_dir: Path) -> PeftAdapter:
    """Read a PEFT prompt-tuning adapter directory and run the checks that need no model.

    Raises:
        ConversionError: A PEFT method or task other than prompt tuning for a causal LM.
        PatchRejected: Missing or malformed files (``bad_format``, ``oversized``), or a tensor that does not
            match the config (``bad_shape``).
    """
    config = _read_config(adapter_dir)
    rows, metadata = _read_rows(adapter_dir, config)
    return PeftAdapter(config=config, rows=rows, metadata=metadata)


def check_base_model(adapter: PeftAdapter, expect: ModelSpec, *, accept_base: str | None = None) -> None:
    """Check that ``adapter`` was made for the model of ``expect``.

    The first of these that applies decides. A fingerprint recorded by a patchserve export must equal
    ``expect.fingerprint``. Otherwise, if ``base_model_name_or_path`` is a local model directory, its
    fingerprint must equal it. Otherwise (a Hub id, or a path that is not on this machine) nothing can be
    fingerprinted, and the caller must vouch for the name by passing it as ``accept_base``.

    Raises:
        PatchRejected: ``wrong_model``.
    """
    recorded = adapter.metadata.get(BASE_MODEL_KEY)
    if recorded is not None:
        if recorded != expect.fingerprint:
            raise PatchRejected(
                RejectReason.wrong_model,
                f"adapter was exported from a patch for base model {recorded[:19]}…, "
                f"this model is {expect.fingerprint[:19]}…",
            )
        return
    named = adapter.config.base_model_name_or_path
    if named and Path(named).is_dir():
        try:
            found = fingerprint_model(Path(named))
        except (OSError, KeyError, ValueError) as exc:
            raise PatchRejected(
                RejectReason.wrong_model, f"cannot fingerprint the adapter's base model {named!r}: {exc}"
            ) from exc
        if found != expect.fingerprint:
            raise PatchRejected(
                RejectReason.wrong_model,
                f"adapter's base model {named!r} has fingerprint {found[:19]}…, this model is "
                f"{expect.fingerprint[:19]}…",
            )
        return
    if not named:
        raise PatchRejected(
            RejectReason.wrong_model, f"adapter names no base model (base_model_name_or_path in {CONFIG_NAME})"
        )
    if accept_base == named:
        return
    raise PatchRejected(
        RejectReason.wrong_model,
        f"adapter names base model {named!r}, which is not a model directory here, so its fingerprint cannot "
        f"be checked; accept it explicitly (--accept-base {named!r}) if it is the model being patched",
    )


def adapter_to_patch(
    adapter: PeftAdapter,
    *,
    meta: PatchMetadata,
    expect: ModelSpec,
    accept_base: str | None = None,
    key: Ed25519PrivateKey | None = None,
) -> bytes:
    """Format-v1 bytes of ``adapter`` as a prefix patch, validated against ``expect`` and signed with ``key``.

    Args:
        adapter: From :func:`read_adapter`.
        meta: Name, version, domain and description of the new patch. Its ``base_model`` must be
            ``expect.fingerprint`` and its placement prefix.
        expect: The model the patch is for.
        accept_base: A ``base_model_name_or_path`` that cannot be fingerprinted but is accepted as
            ``expect``'s model (see :func:`check_base_model`).
        key: Signing key; None leaves the file unsigned.

    Raises:
        PatchRejected: ``bad_shape`` (token_dim), ``wrong_model`` (base model), or any reason of
            :func:`patches.format.parse_patch`.
        ValueError: ``meta`` is not for ``expect`` or not a prefix patch (a caller's mistake).
    """
    if meta.base_model != expect.fingerprint or meta.placement != Placement.prefix:
        raise ValueError("meta must name expect.fingerprint as base_model, with prefix placement")
    if adapter.config.token_dim != expect.hidden_size:
        raise PatchRejected(
            RejectReason.bad_shape,
            f"adapter token_dim {adapter.config.token_dim} does not match the model's hidden size {expect.hidden_size}",
        )
    check_base_model(adapter, expect, accept_base=accept_base)
    data = dump_patch(adapter.rows, meta)
    if key is not None:
        data = sign_patch(data, key)
    parse_patch(data, expect=expect)
    return data


def patch_to_adapter(data: bytes, *, expect: ModelSpec, base_model_name: str) -> PeftAdapter:
    """The PEFT prompt-tuning adapter of a prefix patch: the stored rows (same dtype, same bytes) and a config.

    Args:
        data: The patch file's bytes (its signature is not checked; the export carries none).
        expect: The model the patch must be for.
        base_model_name: Written as ``base_model_name_or_path`` (what ``AutoPeftModel`` would load).

    Raises:
        PatchRejected: Any reason of :func:`patches.format.parse_patch`.
        ConversionError: A suffix patch.
    """
    patch = parse_patch(data, expect=expect)
    if patch.placement != Placement.prefix:
        raise ConversionError(
            f"patch {patch.ref} has placement {patch.placement.value}: its rows go after the prompt, directly "
            "before the reply, and PEFT prompt tuning can only prepend virtual tokens to the whole input; "
            "only prefix patches export"
        )
    _, stored, _ = read_patch(data)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=patch.n_tokens,
        token_dim=expect.hidden_size,
        num_transformer_submodules=1,
        base_model_name_or_path=base_model_name,
        inference_mode=True,
    )
    metadata = {"format": "pt", BASE_MODEL_KEY: expect.fingerprint, PATCH_REF_KEY: patch.ref, DIGEST_KEY: patch.digest}
    return PeftAdapter(config=config, rows=stored.contiguous(), metadata=metadata)


def write_adapter(adapter: PeftAdapter, out_dir: Path) -> list[Path]:
    """Write ``adapter_config.json`` (PEFT's own ``save_pretrained``) and ``adapter_model.safetensors``.

    Returns:
        The two paths written.

    Raises:
        OSError: ``out_dir`` is a file or cannot be written.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is not a directory")
    adapter.config.save_pretrained(str(out_dir))
    weights = st_save({PEFT_TENSOR_KEY: adapter.rows.detach().contiguous().cpu()}, metadata=adapter.metadata)
    return [out_dir / CONFIG_NAME, write_atomic(out_dir / SAFETENSORS_WEIGHTS_NAME, weights)]
