"""Token log-probabilities and entropies without a full ``[batch, seq, vocab]`` fp32 tensor.

For a response token ``y_t`` with hidden state ``h_{t-1}``::

    z = W h_{t-1} / T                      (logits over the shared vocabulary, temperature T)
    log pi(y_t) = z[y_t] - logsumexp(z)
    H_t = logsumexp(z) - sum_v softmax(z)_v z_v

The LM head runs over the sequence in chunks of ``chunk_size`` positions. When gradients are needed each chunk is
wrapped in activation checkpointing, so only one chunk of logits is alive in forward *and* backward: peak memory
grows with the chunk, not with the sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlad_pl.core.backbone import backbone


def _head_chunk(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if with_entropy:
        ent = lse - (logits.softmax(-1) * logits).sum(-1)
    else:
        ent = torch.zeros_like(logp)
    return logp, ent


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                           temperature: float = 1.0, chunk_size: int = 256, with_entropy: bool = False,
                           vocab_size: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``log pi(targets)`` (and the entropy) from hidden states ``[N, R, H]`` and LM-head ``weight [V, H]``.

    ``vocab_size`` limits the softmax to the first rows of ``weight`` (models whose embedding is padded beyond the
    tokenizer). Returns fp32 ``[N, R]`` tensors; entropy is ``None`` unless ``with_entropy``.
    """
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lps, ents = [], []
    for s in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, s:s + chunk_size], targets[:, s:s + chunk_size]
        if use_ckpt:
            lp, ent = checkpoint(_head_chunk, h, weight, bias, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(h, weight, bias, t, temperature, with_entropy)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps, 1) if lps else hidden.new_zeros(targets.shape, dtype=torch.float32)
    ent = (torch.cat(ents, 1) if ents else torch.zeros_like(logp)) if with_entropy else None
    return logp, ent


def response_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Final hidden states that predict the response tokens: positions ``P-1 .. L-2`` -> ``[N, R, H]``."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state[:, prompt_len - 1:-1]


def response_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, *,
                      temperature: float = 1.0, chunk_size: int = 256, with_entropy: bool = False,
                      vocab_size: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs ``[N, R]`` of the response tokens ``input_ids[:, P:]`` under ``model`` (chunked LM head)."""
    hidden = response_hidden(model, input_ids, attention_mask, prompt_len)
    head = model.get_output_embeddings()
    return chunked_token_logprobs(hidden, head.weight, input_ids[:, prompt_len:], bias=getattr(head, "bias", None),
                                  temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
                                  vocab_size=vocab_size)
