"""The ``model`` field as a stack selector: ``<base>``, ``<base>:none``, ``<base>:name@version+name``.

Patch names cannot contain ``:`` or ``+`` (:mod:`patches.stack`), so the spelling is unambiguous; it is
also what ``X-Patch-Applied`` prints after the colon, and what ``GET /v1/models`` lists.
"""

from __future__ import annotations

from patches.errors import StackError
from patches.stack import PatchRef, parse_stack

MODEL_PARAM = "model"
STACK_SEP = ":"
REF_JOIN = "+"


class UnknownModel(LookupError):
    """A ``model`` that is neither the served base model nor ``<base>:<stack>`` (404, like OpenAI's)."""

    param = MODEL_PARAM
    code = "model_not_found"


class ModelSpecError(StackError):
    """A malformed stack in ``model``, or one that contradicts ``X-Patch-Stack`` (400)."""

    param = MODEL_PARAM


def parse_model(model: str | None, base: str) -> list[PatchRef] | None:
    """The stack a ``model`` value selects: ``<base>`` or no model selects none (None: the header or the
    tenant's default decides), ``<base>:none`` the bare model, ``<base>:a@2+b`` that ordered stack.

    Raises:
        UnknownModel: Not the served base model.
        ModelSpecError: A malformed stack after the colon.
    """
    if model is None or model == base:
        return None
    prefix = base + STACK_SEP
    if not model.startswith(prefix):
        raise UnknownModel(
            f"the model {model!r} does not exist: this server serves {base!r}, with a patch stack as "
            f"'{base}{STACK_SEP}name@version{REF_JOIN}name' (GET /v1/models lists them)"
        )
    spec = model[len(prefix) :]
    if "," in spec:
        raise ModelSpecError(f"model {model!r}: join the patches of a stack with {REF_JOIN!r}, not ','")
    try:
        return parse_stack(spec.replace(REF_JOIN, ","))
    except StackError as exc:
        raise ModelSpecError(f"model {model!r}: {exc}") from exc


def model_name(base: str, refs: list[PatchRef] | list[str]) -> str:
    """The ``model`` value that selects ``refs`` (``base:none`` for the empty stack)."""
    return f"{base}{STACK_SEP}{REF_JOIN.join(map(str, refs)) or 'none'}"


def model_id(base: str, applied: str) -> str:
    """The ``model`` a response reports for the stack it ran with (``applied``, as in ``X-Patch-Applied``):
    ``base:a@3+b@1``, or ``base`` when bare; as OpenAI names the snapshot an alias resolved to."""
    return base if applied == "none" else f"{base}{STACK_SEP}{applied}"
