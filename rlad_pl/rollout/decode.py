"""A KV-cached sampling loop for causal LMs: what ``HFSampler`` runs instead of ``transformers``' ``generate``.

Why not ``generate``: its per-step Python (logits-processor and stopping-criteria plumbing, mask and kwargs updates)
dominates on small models, and it keeps every row in the batch until the longest one ends, while rollout lengths
vary a lot (chain-sum answers: mean ~20 of 64 tokens). This loop:

- prefills each distinct prompt once and repeats its KV cache ``n`` times (prompt sharing within a group);
- drops a row from the batch (and its KV cache) as soon as it emits ``eos`` (``compact``);
- samples exactly ``softmax(z / T)`` restricted by top-k then top-p (``transformers``' own warpers, in
  ``generate``'s order), and nothing else: no repetition penalty or other defaults from a model's
  ``generation_config.json`` (like the vLLM sampler, whose ``generation_config`` is ``"vllm"``);
- with ``vocab_size``, keeps only the first ``vocab_size`` logit columns (an embedding padded past the tokenizer,
  e.g. Qwen3: 151,936 rows, 151,669 tokens), the trainer's ``log_softmax(z[:V] / T)``; a slice, no per-step work.

With ``compact=False`` it consumes the random stream like ``generate(do_sample=True)`` and returns the same tokens
for the same seed (tests); compaction changes which random numbers land on which row, not the distribution.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _warp(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """``generate``'s temperature, top-k, top-p warpers, in its order, on fp32 logits ``[N, V]``."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = TopKLogitsWarper(top_k=top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p=top_p)(None, logits)
    return logits


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, n: int, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           compact: bool = True, vocab_size: Optional[int] = None) -> Tensor:
    """Sample ``n`` responses per left-padded prompt row -> ``[rows * n, max_new_tokens]`` (grouped: rows
    ``i*n .. i*n+n-1`` answer prompt ``i``); after a row's ``eos`` come ``pad_id`` tokens. ``temperature <= 0``:
    greedy (argmax). ``vocab_size``: sample (and argmax) over ``logits[:, :vocab_size]`` only (None: all)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    position = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :vocab_size].float()
    mask, next_pos = attention_mask, position[:, -1:] + 1
    if n > 1:  # prompt sharing: one prefill per prompt, its cache repeated for the group
        cache.batch_repeat_interleave(n)
        logits, mask, next_pos = (t.repeat_interleave(n, 0) for t in (logits, mask, next_pos))
    total = logits.shape[0]
    tokens = torch.full((total, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    rows = torch.arange(total, device=logits.device)  # which output row each batch row writes
    alive = torch.ones(total, dtype=torch.bool, device=logits.device)  # (compact=False) rows not yet ended
    greedy = temperature <= 0
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(_warp(logits, temperature, top_k, top_p), -1)
            nxt = torch.multinomial(probs, 1).squeeze(1)
        if compact:
            tokens[rows, t] = nxt
            ended = nxt == eos_id
        else:
            nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            tokens[:, t] = nxt
            alive = alive & (nxt != eos_id)
            ended = None
        if t == max_new_tokens - 1:
            break
        if compact and bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, nxt, mask, next_pos = rows[keep], nxt[keep], mask[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        elif not compact and not bool(alive.any()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        logits = out.logits[:, -1, :vocab_size].float()
        next_pos = next_pos + 1
    return tokens
