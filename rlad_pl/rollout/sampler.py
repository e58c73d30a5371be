"""The ``Sampler`` interface that both the embedded Hugging Face engine and vLLM implement.

An engine may keep its own copy of the weights (vLLM), so sampling is always preceded by ``sync_weights(model)``;
the Hugging Face sampler generates with the training model itself and its sync is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """Decoding settings. ``temperature`` also scales the log-probs of student, old policy, reference and teacher
    (logits / T) so that every ratio and KL in the objectives compares distributions at the same temperature.

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: response length cap; responses cut here are "truncated".
        n: responses per prompt (the group size during training).
        seed: base seed; the data module adds the epoch so each rollout batch differs but is reproducible.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate("sampling")

    def validate(self, prefix: str) -> SamplingParams:
        """Raise ``ConfigError`` naming ``<prefix>.<field>`` for a value no engine can honour (instead of an engine
        traceback or a silent change): temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, n >= 1."""
        from rlad_pl.core.validation import check_float, check_int

        check_float(f"{prefix}.temperature", self.temperature, low=0.0, hint=" (0 = greedy)")
        check_float(f"{prefix}.top_p", self.top_p, low=0.0, high=1.0, low_open=True, hint=" (1.0 = off)")
        check_int(f"{prefix}.top_k", self.top_k, minimum=0, hint=" (0 = off)")
        check_int(f"{prefix}.max_new_tokens", self.max_new_tokens, minimum=1)
        check_int(f"{prefix}.n", self.n, minimum=1)
        check_int(f"{prefix}.seed", self.seed, minimum=0)
        return self

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)


@dataclass
class Generation:
    """Responses for ``len(prompts) * n`` rows, grouped: rows ``i*n .. i*n+n-1`` answer prompt ``i``."""

    completion_ids: list[list[int]]  # response tokens, eos included when generated
    finished: list[bool]  # ended with eos (False: cut at max_new_tokens)
    logprobs: Optional[list[list[float]]] = None  # engine log-probs of the response tokens, when provided


class Sampler:
    """Base class for rollout engines.

    ``max_off_policy_steps > 0`` (``rlad_pl.pipeline.asynchronous``) takes a ``snapshot`` of the student's weights
    when a rollout batch is due and later has the engine sample from it (``load_snapshot``). ``overlaps``: the
    engine generates outside the trainer's process and device (a server), so this can run while the trainer trains.
    """

    overlaps: bool = False

    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        """Called once before the first rollout with the student and its tokenizer."""
        self.tokenizer = tokenizer

    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        """Make the engine sample from ``model``'s current weights; returns stats (bytes moved...)."""
        return {}

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        raise NotImplementedError

    def snapshot(self, model: torch.nn.Module):
        """A copy of ``model``'s weights that ``load_snapshot`` can load later (called on every rank, in order)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample from earlier weights")

    def load_snapshot(self, snapshot) -> dict[str, float]:
        """Make the engine sample from a ``snapshot``; returns stats like ``sync_weights``."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample from earlier weights")
