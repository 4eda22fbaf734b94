"""Tokenizer loading (tokenizer.json via the `tokenizers` library), prompt encoding and incremental
detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, or None for a token-ids-only model (e.g. dummy benchmark weights)."""
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: text through the checkpoint's tokenizer (with its special tokens, e.g. BOS), ids
    as they are. The engine and the router both call this, so a text prompt is the same ids on either side."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer.json; pass prompt token ids instead of text")
        return tokenizer.encode(prompt, add_special_tokens=True).ids
    return list(prompt)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, and applies stop strings.

    Decodes only a short window of recent ids per token: `prefix_offset:read_offset` is text already emitted
    and `read_offset:` is new. A window ending in U+FFFD is an incomplete multi-byte character, held back until
    the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str | None:
        """Append one token. Returns the stop string that matched (text is then cut before it), else None."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return None
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if window.endswith("\ufffd") or len(window) <= len(prefix):
            return None
        before = len(self.text)
        self.text += window[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not self.stop:
            return None
        # A stop string may straddle the previous delta, so search from max_stop_len - 1 characters back.
        start = max(0, before - self.max_stop_len + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        index, matched = min(hits)
        self.text = self.text[:index]
        return matched

    def flush(self) -> None:
        """At the end of a request, emit text held back for an incomplete character (rendered as U+FFFD)."""
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.text += window[len(prefix) :]
        self.read_offset = len(self.ids)
