"""Loading student / teacher models and tokenizers, compatibility checks, and tiny local model builders.

Nothing here downloads: every path must be a local directory written by ``save_pretrained`` (or by
``tools/build_tiny_models.py``). Relative paths are looked up in the working directory first, then inside the
installed ``rlad_pl`` package (so ``assets/tiny-student`` works from any directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlad_pl.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent

#: characters of the default char-level vocabulary (after ``<pad> <bos> <eos>``)
DEFAULT_CHARS = list("0123456789+-*/=;#.,:?()<> ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def resolve_path(path: str | os.PathLike, field: str) -> Path:
    """Return an existing local model directory for ``path`` or raise a one-line ``ConfigError`` naming ``field``."""
    p = Path(os.path.expanduser(str(path)))
    for candidate in (p, PACKAGE_DIR / p):
        if (candidate / "config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    raise ConfigError(field, f"no model directory at '{path}' (expected a local folder with config.json; "
                             "nothing is downloaded)")


def load_tokenizer(path: str | os.PathLike, field: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_path(path, field)))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(field, "tokenizer has neither a pad nor an eos token; one is needed for padding")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | os.PathLike, field: str, dtype: str | torch.dtype = "float32",
                   trainable: bool = True) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a local path; frozen models are put in eval mode without grad."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_path(path, field)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ConfigError(field.rsplit(".", 1)[0] + ".dtype", f"unknown dtype '{dtype}' (expected float32, "
                              "bfloat16 or float16)")
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(resolved), dtype=dtype)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def check_tokenizers_match(student_tok, teacher_tok, field: str = "model.teacher") -> None:
    """Fail with one line when teacher and student tokenizers would map the same ids to different strings."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
        diff_ids = [k for k in s_vocab if k in t_vocab and s_vocab[k] != t_vocab[k]][:3]
        raise ConfigError(field, f"teacher and student vocabularies differ (student {len(s_vocab)} tokens, teacher "
                                 f"{len(t_vocab)}; only in student: {only_s}, only in teacher: {only_t}, "
                                 f"different ids: {diff_ids}); distillation needs a shared tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        s, t = getattr(student_tok, name), getattr(teacher_tok, name)
        if s != t:
            raise ConfigError(field, f"teacher and student special tokens differ: {name} is {t} for the teacher "
                                     f"and {s} for the student")


def shared_vocab_size(tokenizer, *models: torch.nn.Module) -> int:
    """Number of logit columns that mean the same token in every model (embeddings may be padded past the
    tokenizer)."""
    n = len(tokenizer)
    for m in models:
        n_out = m.get_output_embeddings().weight.shape[0]
        if n_out < n:
            raise ConfigError("model", f"a model's output layer has {n_out} rows but the tokenizer has {n} tokens")
    return n


# ---------------------------------------------------------------------------------------------------------------
# tiny local models (tests, demos): a char-level tokenizer and a small Qwen2 config
# ---------------------------------------------------------------------------------------------------------------

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
