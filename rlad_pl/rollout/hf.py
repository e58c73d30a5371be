"""Embedded default sampler: Hugging Face ``generate`` on the training model itself."""

from __future__ import annotations

import torch

from rlad_pl.core.batch import pad_rows
from rlad_pl.core.errors import warn_once
from rlad_pl.rollout.decode import decode
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams


class HFSampler(Sampler):
    """Samples with ``model.generate`` on the live student (no weight copy, so ``sync_weights`` only rebinds).

    An FSDP2-sharded model is different: ``generate`` stops when a rank's own sequences end, so ranks would fall out
    of step in the per-layer all-gathers. ``sync_weights`` then gathers the weights (a collective: every rank calls
    it) into a plain rank-local copy, refreshed in place at each sync, and sampling runs on it without collectives.

    Sampling runs ``rlad_pl.rollout.decode`` (prompt sharing, finished rows leave the batch, no per-step
    ``generate`` plumbing; ``decode: generate`` keeps ``transformers``' ``generate``, which also applies the model's
    ``generation_config.json`` defaults). Either way only the tokenizer's ``len(tokenizer)`` ids are sampled: an LM
    head padded past the tokenizer (Qwen3: 151,936 rows, 151,669 tokens) has its extra columns dropped, so the
    sampler draws from the trainer's ``softmax(logits[:V] / T)``. Calls are cut by *sequences*, not prompts: 1024
    prompts x 1 sample take as few calls as 128 x 8 (per-token Python cost is per call, so 16 calls of 64 rows took
    2.2x the time of 2 of 512).

    Args:
        batch_size: sequences (prompts x samples) per engine call, at least one prompt (bounds the KV cache).
        decode: ``loop`` (default, ``rlad_pl.rollout.decode``) or ``generate`` (``model.generate``).
    """

    def __init__(self, batch_size: int = 1024, decode: str = "loop"):
        from rlad_pl.core.validation import check_choice, check_int

        self.batch_size = check_int("data.sampler.init_args.batch_size", batch_size)
        self.decode = check_choice("data.sampler.init_args.decode", decode, ("loop", "generate"))
        self.model = None
        self._copy = None  # unsharded copy of a sharded model

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        self.model = model

    def sync_weights(self, model) -> dict[str, float]:
        from rlad_pl.models.distributed import is_sharded
        from rlad_pl.models.unsharded import unsharded_copy

        if is_sharded(model):
            self._copy, nbytes = unsharded_copy(model, self._copy)
            self.model = self._copy
            return {"weight_sync_bytes": float(nbytes)}
        self.model = model
        return {"weight_sync_bytes": 0.0}

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        model, tok = self.model, self.tokenizer
        pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        longest = max((len(p) for p in prompt_ids), default=0)
        if isinstance(limit, int) and longest + params.max_new_tokens > limit:  # generate runs on, past the range
            warn_once("data.sampling.max_new_tokens", f"the longest prompt ({longest} tokens) + max_new_tokens "
                      f"({params.max_new_tokens}) exceeds the model's max_position_embeddings {limit}")
        greedy = params.temperature <= 0
        # greedy decoding gives n identical responses: decode once, then repeat each row n times
        kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                      num_return_sequences=1 if greedy else params.n, do_sample=not greedy)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        vocab = len(tok)  # the trainer's V (rlad_pl.models.loading.shared_vocab_size)
        if self.decode == "generate" and _head_rows(model) > vocab:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_FirstColumns(vocab)])  # runs before T / top-k / top-p
        completions: list[list[int]] = []
        finished: list[bool] = []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(params.seed)
                per_call = max(1, self.batch_size // kwargs["num_return_sequences"])  # prompts per call
                for s in range(0, len(prompt_ids), per_call):
                    ids, mask = pad_rows(prompt_ids[s:s + per_call], pad_id, "left")
                    ids, mask = ids.to(device), mask.to(device)
                    if self.decode == "loop":
                        out = decode(model, ids, mask, n=kwargs["num_return_sequences"], eos_id=eos_id,
                                     pad_id=pad_id, max_new_tokens=params.max_new_tokens,
                                     temperature=0.0 if greedy else params.temperature, top_k=params.top_k,
                                     top_p=params.top_p, vocab_size=vocab)
                    else:
                        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
                    for row in out.tolist():
                        if eos_id in row:
                            row = row[:row.index(eos_id) + 1]
                            finished.append(True)
                        else:  # ran to max_new_tokens: every token is real
                            finished.append(False)
                        completions.append(row)
        finally:
            model.train(was_training)
        if greedy and params.n > 1:
            completions = [row for row in completions for _ in range(params.n)]
            finished = [f for f in finished for _ in range(params.n)]
        return Generation(completions, finished)


def _head_rows(model) -> int:
    """Rows of the LM head (logit columns), which may exceed the tokenizer's size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 0) or 0)


class _FirstColumns:
    """``generate`` logits processor: ids ``>= vocab`` (padding rows of the LM head) get ``-inf``."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab:] = float("-inf")
        return scores
