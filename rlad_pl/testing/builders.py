"""Tiny local models for tests, demos and smoke configs: a char-level tokenizer and a small random Qwen2.

``tools/build_tiny_models.py`` and ``tools/build_demo_models.py`` build the shipped ``rlad_pl/assets`` with these.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: characters of the default char-level vocabulary (after ``<pad> <bos> <eos>``)
DEFAULT_CHARS = list("0123456789+-*/=;#.,:?()<> ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_char_tokenizer(chars: list[str] | None = None):
    """A char-level ``PreTrainedTokenizerFast``: ``<pad>=0, <bos>=1, <eos>=2``, then one id per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = DEFAULT_CHARS if chars is None else chars
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>", padding_side="left")


def build_tiny_qwen2(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                     intermediate_size: int = 256, max_positions: int = 256, seed: int = 0):
    """A randomly initialised tiny ``Qwen2ForCausalLM`` (pad/bos/eos = 0/1/2, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def save_tiny_model(out_dir: str | os.PathLike, seed: int = 0, chars: list[str] | None = None, **arch) -> Path:
    """Build and ``save_pretrained`` a tiny char-level model + tokenizer into ``out_dir``."""
    out = Path(out_dir)
    tok = build_char_tokenizer(chars)
    model = build_tiny_qwen2(len(tok), seed=seed, **arch)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
