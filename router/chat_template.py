"""A model's chat template (the `chat_template` of its tokenizer_config.json) rendered the way transformers'
`apply_chat_template` renders it: Jinja2 in a sandbox with trim_blocks and lstrip_blocks, the loop-controls
extension, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text; the variables are
`messages`, `add_generation_prompt` and the special tokens of the config (`bos_token`, `eos_token`, ...).
The rendered text is tokenized without adding special tokens (the template writes them), as transformers does.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception) or did not render."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken's dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)  # NOTE: compiled once; a syntax error fails at load
        self.special_tokens = special_tokens

    @staticmethod
    def load(model_dir: str) -> ChatTemplate | None:
        """The model's chat template, or None when tokenizer_config.json has none (chat is then refused)."""
        path = pathlib.Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text())
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            return None
        tokens = {name: text for name in _SPECIAL if (text := _token_text(cfg.get(name))) is not None}
        return ChatTemplate(source, tokens)

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt text (ChatTemplateError when the template refuses the conversation)."""
        try:
            return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed: {e}") from None
