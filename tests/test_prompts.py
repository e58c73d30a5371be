"""Prompt encoding (``rlad_pl.data.prompts``): chat templates with system prompts, template kwargs, overrides, raw.

The tokenizer is real: a char-level ``PreTrainedTokenizerFast`` saved with a ChatML chat template that injects a
default system prompt when none is given (as SmolLM2's and Qwen2.5's do) and honours ``enable_thinking`` (as
Qwen3's does), reloaded from its files with ``load_tokenizer``. Ids are checked exactly against the vocabulary.
The tokenizer sits in its own folder: next to a Qwen2 ``config.json``, transformers 5 loads it as
``Qwen2Tokenizer``, whose byte-level pre-tokenizer drops the char vocabulary's spaces and newlines.
"""

from __future__ import annotations

import pytest

from rlad_pl.data.prompts import PromptFormat, encode_prompt, render_prompt
from rlad_pl.errors import ConfigError

#: ChatML with a default system prompt and Qwen3's enable_thinking switch (no spaces: the char tokenizer drops them)
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = 'be_brief.' %}{% set turns = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for m in turns %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def save_chat_model(out, template: str | None = TEMPLATE, **arch):
    """A tiny char-level Qwen2 (``out/model``) and its tokenizer (``out/tokenizer``) with ``SPECIALS`` as special
    tokens and ``template`` as chat template."""
    from rlad_pl.models import DEFAULT_CHARS, build_char_tokenizer, build_tiny_qwen2

    tok = build_char_tokenizer(DEFAULT_CHARS + ["\n", "|", "_"] + SPECIALS)
    tok.add_tokens(SPECIALS, special_tokens=True)  # already in the vocabulary: matched whole, ids unchanged
    if template is not None:
        tok.chat_template = template
    model = build_tiny_qwen2(len(tok), **{"hidden_size": 32, "num_layers": 2, "num_heads": 1,
                                          "intermediate_size": 64, **arch})
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "tokenizer")
    return out


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from rlad_pl.models import load_tokenizer

    return load_tokenizer(save_chat_model(tmp_path_factory.mktemp("chat")) / "tokenizer")


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    from rlad_pl.models import load_tokenizer

    return load_tokenizer(save_chat_model(tmp_path_factory.mktemp("plain"), template=None) / "tokenizer")


def ids_of(tok, *pieces: str) -> list[int]:
    """Expected ids from the vocabulary: special tokens whole, everything else one id per character."""
    vocab = tok.get_vocab()
    return [vocab[p] for piece in pieces for p in ([piece] if piece in SPECIALS else list(piece))]


def test_tokenizer_files_carry_the_template(chat_tok, plain_tok):
    assert chat_tok.chat_template == TEMPLATE and not getattr(plain_tok, "chat_template", None)
    assert chat_tok.get_vocab()["<|im_start|>"] == 58 and len(chat_tok) == 60


def test_default_system_prompt_of_the_template_applies_when_none_is_set(chat_tok):
    text = render_prompt(chat_tok, "1+2=")
    assert text == "<|im_start|>system\nbe_brief.<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(chat_tok, "1+2=")
    assert ids == ids_of(chat_tok, "<|im_start|>", "system\nbe_brief.", "<|im_end|>", "\n", "<|im_start|>",
                         "user\n1+2=", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    assert ids[:3] == [58, chat_tok.get_vocab()["s"], chat_tok.get_vocab()["y"]] and 1 not in ids  # no BOS added
    assert chat_tok.decode(ids, skip_special_tokens=False) == text


def test_system_prompt_replaces_the_default_and_empty_gives_an_empty_turn(chat_tok):
    own = encode_prompt(chat_tok, "1+2=", PromptFormat(system_prompt="add."))
    assert own == ids_of(chat_tok, "<|im_start|>", "system\nadd.", "<|im_end|>", "\n", "<|im_start|>",
                         "user\n1+2=", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    empty = render_prompt(chat_tok, "x", PromptFormat(system_prompt=""))
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nx") and "be_brief" not in empty


def test_chat_template_kwargs_reach_the_template(chat_tok):
    off = render_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": False}))
    on = render_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": True}))
    assert off == on + "<think>\n\n</think>\n\n"
    assert on == render_prompt(chat_tok, "1+2=")
    think = ids_of(chat_tok, "<think>\n\n</think>\n\n")
    assert len(think) == 19
    assert encode_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": False})) \
        == encode_prompt(chat_tok, "1+2=") + think


def test_template_override_by_string_and_by_file(chat_tok, plain_tok, tmp_path):
    simple = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    fmt = PromptFormat(chat_template=simple, system_prompt="s")
    assert render_prompt(chat_tok, "1+2", fmt) == "<system>s;<user>1+2;:"  # replaces the tokenizer's template
    assert render_prompt(plain_tok, "1+2", fmt) == "<system>s;<user>1+2;:"  # gives one to a tokenizer without
    f = tmp_path / "t.jinja"
    f.write_text(simple)
    from_file = PromptFormat(chat_template=str(f))
    assert from_file.chat_template == simple
    assert encode_prompt(plain_tok, "1+2", from_file) == ids_of(plain_tok, "<user>1+2;:")


def test_raw_mode_and_the_unchanged_default_without_a_template(chat_tok, plain_tok):
    # no template -> BOS + text: the shipped tiny models keep their encoding (<bos>=1, '1'=4, '+'=13, '2'=5, '='=17)
    assert encode_prompt(plain_tok, "1+2=") == [1, 4, 13, 5, 17]
    assert encode_prompt(chat_tok, "1+2=", PromptFormat(mode="raw")) == [1, 4, 13, 5, 17]
    assert render_prompt(chat_tok, "1+2=", PromptFormat(mode="raw")) is None


def test_bad_settings_are_one_line_errors(chat_tok, plain_tok, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.system_prompt: needs a chat template, but mode "
                                          r"is 'raw'"):
        PromptFormat(mode="raw", system_prompt="x")
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.mode: 'chat' needs a chat template, but the "
                                          r"tokenizer has none"):
        encode_prompt(plain_tok, "1", PromptFormat(mode="chat"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.system_prompt: needs a chat template, but the "
                                          r"tokenizer has none"):
        encode_prompt(plain_tok, "1", PromptFormat(system_prompt="x"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template_kwargs: needs a chat template"):
        encode_prompt(plain_tok, "1", PromptFormat(chat_template_kwargs={"enable_thinking": False}))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template: no such file '.*nope\.jinja'"):
        PromptFormat(chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.mode: expected auto, chat or raw, got 'text'"):
        PromptFormat(mode="text")
    broken = PromptFormat(chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template: the chat template failed to "
                                          r"render \(only user turns\)"):
        encode_prompt(chat_tok, "1", broken)
