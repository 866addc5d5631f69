"""patchserve's patch lifecycle: format → sign → verify → registry.

A *patch* is a small learned soft prompt (``[n_virtual_tokens, hidden_size]``) prepended to a
request's input embeddings. The flow, one public module per step:

* :mod:`patches.format` — the file format v1 (safetensors + string metadata) and its validation,
  :func:`~patches.format.parse_patch` returning a :class:`~patches.format.Patch` or raising
  :class:`~patches.errors.PatchRejected` with a :class:`~patches.errors.RejectReason`.
* :mod:`patches.fingerprint` — the base-model fingerprint a patch is bound to.
* :mod:`patches.signing` / :mod:`patches.trust` — Ed25519 signatures over the content digest, the
  trust store and the revocation list; ``Verifier(trust).verify(data, expect=spec)``.
* :mod:`patches.oms` — detached OMS (OpenSSF model signing) bundles with EC keys, by the
  ``model-signing`` package; ``Verifier(trust).verify(data, expect=spec, bundle=bundle)``.
* :mod:`patches.rollback` — version floors that survive restarts.
* :mod:`patches.registry` — loaded versions, swapped atomically; resolution of ``name[@version]``.
* :mod:`patches.stack` — ``X-Patch-Stack`` parsing and the engine-input layout shared with training.
* :mod:`patches.tenants` — the tenant file: default stacks, allowed patches and signers, key hashes.
* :mod:`patches.peft_interop` — PEFT prompt-tuning adapters to prefix patches and back.
* :mod:`patches.audit` / :mod:`patches.cli` — inspect and diff for auditors; the ``patchserve`` CLI.

This package never imports FastAPI, vLLM or :mod:`server`.
"""

__all__ = [
    "audit",
    "basemodel",
    "demo",
    "errors",
    "fingerprint",
    "format",
    "oms",
    "peft_interop",
    "registry",
    "rollback",
    "signing",
    "stack",
    "tenants",
    "textinit",
    "trust",
]
