"""Engine log-probabilities in OpenAI's two response shapes: chat's ``content`` list, and text
completions' parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine import TokenLogprob
from server.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """``logprobs`` of a chat choice (or chunk): each token with its ``top_logprobs`` alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_bytes(e.token),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for t, lp in e.top],
            )
            for e in entries
        ]
    )


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """``logprobs`` of a completion choice (or chunk) whose first token starts at character ``offset`` of
    the choice's text. As in OpenAI's API, ``top_logprobs`` holds the requested alternatives plus the
    generated token itself, so a position may have one more entry than asked for."""
    out = CompletionLogprobs()
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        top = dict(e.top)
        top.setdefault(e.token, e.logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out
