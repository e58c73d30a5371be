"""``StaleSampler``: sample in the trainer's process from the student's weights of some optimizer steps ago.

A tool for studying staleness, not for speed: with ``data.max_off_policy_steps: k`` the asynchronous pipeline
(``rlad_pl.pipeline.asynchronous``) asks every rollout batch from the weights it would have on a server at the same
``k`` (a snapshot taken at the same optimizer step), but generation runs inline, in the trainer's thread, on a copy
of the student (``shadow``). The batches are the ones the served asynchronous path makes at the same ``k``
(``tests/test_async.py``); only the wall-clock overlap is missing. Wraps any in-process sampler (Hugging Face by
default, ``VLLMSampler`` for speed); reports the behaviour policy's log-probs (the copy's, at the sampling
temperature) when the wrapped engine reports none.

    data:
      max_off_policy_steps: 2
      sampler:
        class_path: rlad_pl.rollout.stale.StaleSampler
        init_args: {sampler: {class_path: rlad_pl.rollout.vllm.VLLMSampler, init_args: {...}}}
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams


class StaleSampler(Sampler):
    """See the module docstring. ``sampler``: the in-process engine to wrap (default ``HFSampler``)."""

    def __init__(self, sampler: Optional[Sampler] = None):
        if sampler is not None and (not isinstance(sampler, Sampler) or isinstance(sampler, StaleSampler)
                                    or sampler.overlaps):
            raise ConfigError("data.sampler.init_args.sampler", "expected an in-process sampler (HFSampler or "
                              f"VLLMSampler), got {type(sampler).__name__}")
        if sampler is None:
            from rlad_pl.rollout.hf import HFSampler

            sampler = HFSampler()
        self.inner = sampler
        self.shadow: Optional[torch.nn.Module] = None

    @property
    def max_model_len(self):
        return getattr(self.inner, "max_model_len", None)

    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        super().setup(model, tokenizer)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError("data.sampler", "StaleSampler is a one-process study tool; several processes sample "
                              "stale rollouts from rlad_pl.rollout.server.ServerSampler")
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.inner.setup(self.shadow, tokenizer)

    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def load_snapshot(self, snapshot: dict[str, torch.Tensor]) -> dict[str, float]:
        self.shadow.load_state_dict(snapshot)
        return self.inner.sync_weights(self.shadow)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        self.shadow.load_state_dict(model.state_dict())
        return self.inner.sync_weights(self.shadow)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        gen = self.inner.generate(prompt_ids, params)
        if gen.logprobs is None and gen.completion_ids:
            gen.logprobs = self.behaviour_logprobs(prompt_ids, gen, params)
        return gen

    def behaviour_logprobs(self, prompt_ids: list[list[int]], gen: Generation, params: SamplingParams
                           ) -> list[list[float]]:
        """The copy's log-probs of the sampled tokens at the sampling temperature (what a server reports)."""
        from rlad_pl.core.batch import build_sequences
        from rlad_pl.core.logprobs import response_logprobs

        n = len(gen.completion_ids) // max(len(prompt_ids), 1)
        ids, mask, P, _ = build_sequences([p for p in prompt_ids for _ in range(n)], gen.completion_ids,
                                          self.tokenizer.pad_token_id)
        rows = self.shadow.get_output_embeddings().weight.shape[0]
        vocab = len(self.tokenizer) if rows > len(self.tokenizer) else None
        lp, _ = response_logprobs(self.shadow, ids, mask, P, temperature=params.temperature or 1.0,
                                  vocab_size=vocab)
        return [lp[i, :len(c)].tolist() for i, c in enumerate(gen.completion_ids)]

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


__all__ = ["StaleSampler"]
