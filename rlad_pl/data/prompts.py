"""Prompt encoding: problem text -> prompt token ids, the way the model is asked.

The data module encodes every prompt once with ``encode_prompt`` and hands the ids to the sampler (HF ``generate``
or vLLM, which receives token ids and never re-tokenizes), so both engines start from identical ids; the teacher's
privileged prompt (OPSD) and ``evaluate_policy`` use the same function and settings.

``PromptFormat`` (``data.prompt_format`` in YAML) holds the settings users of ``transformers`` / TRL expect:

* ``mode``: ``auto`` (default) applies the chat template when there is one (the tokenizer's or ``chat_template``)
  and otherwise encodes ``BOS + text`` (the shipped char-level tiny models have no template); ``chat`` requires a
  template; ``raw`` never applies one.
* ``system_prompt``: a system turn before the user turn. ``None`` adds none, but **a template may inject its own
  default system prompt** then: SmolLM2-Instruct's adds "You are a helpful AI assistant named SmolLM, trained by
  Hugging Face", Qwen2.5's "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." Set
  ``system_prompt: ""`` for an empty system turn, or your own text. The rollout samples logged to TensorBoard
  (``rollouts/samples``) and the first-prompt log line show each prompt as the model sees it, template included.
* ``chat_template_kwargs``: extra variables for the template, passed to ``apply_chat_template``, e.g.
  ``{enable_thinking: false}`` for Qwen3.
* ``chat_template``: a Jinja template string, or the path of a file holding one, replacing the tokenizer's.

The rendered chat text is tokenized without special tokens added (templates write their own BOS where the model
wants one); raw text gets the tokenizer's BOS prepended when it has one. Chat settings with no template to apply
(``mode: raw``, or ``auto`` on a tokenizer without one) are an error, not silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from rlad_pl.core.errors import ConfigError

FIELD = "data.prompt_format"


@dataclass
class PromptFormat:
    """How prompt text is turned into token ids (see the module docstring).

    Args:
        mode: ``auto`` | ``chat`` | ``raw``.
        system_prompt: system turn text; None: no system turn (the template's default, if any, applies).
        chat_template_kwargs: extra template variables, e.g. ``{enable_thinking: false}``.
        chat_template: Jinja string or file path overriding the tokenizer's template.
    """

    mode: Literal["auto", "chat", "raw"] = "auto"
    system_prompt: Optional[str] = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: Optional[str] = None

    def __post_init__(self):
        if self.mode not in ("auto", "chat", "raw"):
            raise ConfigError(f"{FIELD}.mode", f"expected auto, chat or raw, got '{self.mode}'")
        self.chat_template = load_template(self.chat_template)
        if self.mode == "raw":
            chat_only = [n for n in ("system_prompt", "chat_template") if getattr(self, n) is not None]
            chat_only += ["chat_template_kwargs"] if self.chat_template_kwargs else []
            if chat_only:
                raise ConfigError(f"{FIELD}.{chat_only[0]}", "needs a chat template, but mode is 'raw' (set mode: "
                                  "auto or chat, or drop the setting)")


def load_template(value: Optional[str]) -> Optional[str]:
    """A Jinja string as is; an existing file's text; anything else is an error (a mistyped path)."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{FIELD}.chat_template", f"cannot read '{value}' ({type(e).__name__})") from None
    raise ConfigError(f"{FIELD}.chat_template", f"no such file '{value}' (expected a Jinja template string or the "
                      "path of a file holding one)")


def uses_chat(tok, fmt: PromptFormat) -> bool:
    """Whether prompts go through a chat template under ``fmt`` (raises when ``chat`` mode has none)."""
    has_template = bool(fmt.chat_template or getattr(tok, "chat_template", None))
    if fmt.mode == "raw":
        return False
    if not has_template:
        if fmt.mode == "chat":
            raise ConfigError(f"{FIELD}.mode", "'chat' needs a chat template, but the tokenizer has none (set "
                              f"{FIELD}.chat_template or mode: raw)")
        chat_only = ["system_prompt"] if fmt.system_prompt is not None else []
        chat_only += ["chat_template_kwargs"] if fmt.chat_template_kwargs else []
        if chat_only:
            raise ConfigError(f"{FIELD}.{chat_only[0]}", "needs a chat template, but the tokenizer has none (set "
                              f"{FIELD}.chat_template, or drop the setting)")
    return has_template


def messages(text: str, fmt: PromptFormat) -> list[dict[str, str]]:
    """The conversation for one prompt: an optional system turn, then the user turn."""
    system = [] if fmt.system_prompt is None else [{"role": "system", "content": fmt.system_prompt}]
    return system + [{"role": "user", "content": text}]


def render_prompt(tok, text: str, fmt: Optional[PromptFormat] = None) -> Optional[str]:
    """The chat-templated prompt text (with the generation prompt), or None when ``fmt`` encodes raw text."""
    fmt = fmt or PromptFormat()
    if not uses_chat(tok, fmt):
        return None
    try:
        return tok.apply_chat_template(messages(text, fmt), chat_template=fmt.chat_template,
                                       add_generation_prompt=True, tokenize=False, **fmt.chat_template_kwargs)
    except Exception as e:  # jinja2 TemplateError and friends: one line naming the setting
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{FIELD}.chat_template", f"the chat template failed to render ({msg})") from None


def encode_prompt(tok, text: str, fmt: Optional[PromptFormat] = None) -> list[int]:
    """Prompt token ids: the rendered chat template tokenized without added special tokens, or (raw) the plain
    encoding with BOS prepended when the tokenizer has a BOS token."""
    rendered = render_prompt(tok, text, fmt)
    if rendered is not None:
        return tok(rendered, add_special_tokens=False)["input_ids"]
    ids = tok(text)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


__all__ = ["PromptFormat", "encode_prompt", "render_prompt", "load_template"]
