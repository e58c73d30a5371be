"""A rollout batch -> its optimizer steps of micro-batches (``make_steps``)."""

from __future__ import annotations

import torch

from rlad_pl.core.batch import RolloutBatch, StepBatch


def make_steps(rollout: RolloutBatch, *, steps_per_rollout: int, ppo_epochs: int, micro_batch_size: int,
               group_by_length: bool, seed: int) -> list[StepBatch]:
    """``steps_per_rollout * ppo_epochs`` steps, the batch reshuffled per PPO epoch when there is more than one
    update; ``group_by_length`` orders a step's sequences by length before cutting micro-batches (same loss and
    gradient, less padding). Every micro-batch is trimmed to its own longest prompt and response."""
    n = rollout.num_sequences
    per_step = n // steps_per_rollout
    gen = torch.Generator().manual_seed(seed)
    lengths = rollout.attention_mask.sum(-1)
    steps = []
    for _ in range(ppo_epochs):
        order = torch.randperm(n, generator=gen) if steps_per_rollout * ppo_epochs > 1 else torch.arange(n)
        for s in range(steps_per_rollout):
            idx = order[s * per_step:(s + 1) * per_step]
            if group_by_length:
                idx = idx[torch.argsort(lengths[idx], stable=True)]
            steps.append(StepBatch([rollout.select(idx[j:j + micro_batch_size]).trim_padding()
                                    for j in range(0, per_step, micro_batch_size)]))
    return steps
