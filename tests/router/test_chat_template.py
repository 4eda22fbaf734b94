"""The chat template renderer against transformers' apply_chat_template on the tiny llama's tokenizer config."""

from __future__ import annotations

import pathlib

import pytest

from router.chat_template import ChatMessage, ChatTemplate, ChatTemplateError
from tests.model_factory import CHAT_TEMPLATE, build_tokenizer

MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "  Hi there, ünïcode  "),
            ChatMessage("assistant", "Hello."), ChatMessage("user", "And now?")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    import json

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "chat_template": CHAT_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_renders_as_transformers_does(model_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    template = ChatTemplate.load(str(model_dir))
    assert template is not None
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for add in (True, False):
        want = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in MESSAGES],
                                       add_generation_prompt=add, tokenize=False)
        assert template.render(MESSAGES, add_generation_prompt=add) == want
    assert template.render(MESSAGES).startswith("<s><|system|>\nBe brief.</s>\n")


def test_raise_exception_and_missing_template(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    template = ChatTemplate.load(str(model_dir))
    assert template is not None
    with pytest.raises(ChatTemplateError, match="unknown role: tool"):
        template.render([ChatMessage("tool", "x")])
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert ChatTemplate.load(str(tmp_path)) is None
    assert ChatTemplate.load(str(tmp_path / "absent")) is None


def test_named_templates_pick_the_default(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ x }}"}]}')
    template = ChatTemplate.load(str(tmp_path))
    assert template is not None and template.render([]) == "D"


def test_special_tokens_as_added_token_dicts(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": {"__type": "AddedToken", "content": "<s>"}, "chat_template": "{{ bos_token }}|"}')
    template = ChatTemplate.load(str(tmp_path))
    assert template is not None and template.render([]) == "<s>|"
