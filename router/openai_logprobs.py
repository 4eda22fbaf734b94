"""Logprobs in OpenAI's two shapes, from the engine's TokenLogprob values (one per generated token):

    /v1/completions       "logprobs": {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}],
                                       "text_offset": [...]}
    /v1/chat/completions  "logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [{...}]}]}

A token's text is the tokenizer's decoding of that one id (a token that is part of a multi-byte character
decodes to U+FFFD, as in other servers); without a tokenizer (token-id prompts) it is "token_id:<id>".
A stream renders each chunk's tokens with the same functions; `TextOffsets` carries a completion stream's
running text offset from chunk to chunk.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from engine.logprobs import TokenLogprob


class TokenText:
    """Token id -> its text, memoised (a vocabulary's worth at most)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None \
                else f"token_id:{token_id}"
            self._memo[token_id] = text
        return text


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int = 0) -> tuple[dict[str, Any], int]:
    """The completions shape for these tokens, their text offsets starting at `offset`. Returns it and the
    offset after the last token."""
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        t = text(lp.token_id)
        tokens.append(t)
        offset += len(t)
    body = {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(tid): v for tid, v in lp.top} for lp in lps], "text_offset": offsets}
    return body, offset


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """The chat shape for these tokens."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        t = text(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(tid, v) for tid, v in lp.top]}
                        for lp in lps]}
