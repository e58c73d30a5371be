"""Typed rollout batches.

A ``RolloutBatch`` holds N sequences laid out as ``[left-padded prompt | right-padded response]``:
``input_ids[:, :prompt_len]`` is the prompt block and ``input_ids[:, prompt_len:]`` the response block, whose
valid tokens are marked by ``response_mask``. Per-token tensors (``*_logprobs``) are ``[N, R]`` with
``R = input_ids.shape[1] - prompt_len``; per-sequence tensors are ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    input_ids: Tensor  # [N, P+R] long
    attention_mask: Tensor  # [N, P+R] long
    prompt_len: int  # P
    response_mask: Tensor  # [N, R] float, 1 on response tokens (eos included)
    rewards: Tensor  # [N] float
    advantages: Tensor  # [N] float
    group_ids: Tensor  # [N] long, equal for the G responses of one prompt
    old_logprobs: Optional[Tensor] = None  # [N, R] pi_old at the sampled tokens (None: on-policy single step)
    ref_logprobs: Optional[Tensor] = None  # [N, R] reference model
    teacher_logprobs: Optional[Tensor] = None  # [N, R] teacher at the sampled tokens
    sampler_logprobs: Optional[Tensor] = None  # [N, R] as reported by the inference engine
    teacher_input_ids: Optional[Tensor] = None  # [N, P'+R] privileged-prompt layout (OPSD); None: same as input_ids
    teacher_attention_mask: Optional[Tensor] = None
    teacher_prompt_len: Optional[int] = None
    extras: dict = field(default_factory=dict)  # objective-specific per-sequence tensors, first dim N
    teacher_ids: Optional[Tensor] = None  # [N] long: which named teacher scores each row (None: the only one)
    prompt_texts: Optional[list] = None  # [N] prompt texts (a teacher with another tokenizer re-encodes them)
    weight_version: Optional[Tensor] = None  # [N] long: optimizer steps the sampling weights had (asynchronous)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.input_ids.shape[1] - self.prompt_len

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def position_ids(self) -> Tensor:
        return position_ids_from_mask(self.attention_mask)

    def select(self, index: Tensor | slice) -> RolloutBatch:
        """Rows ``index`` of every tensor field (a micro-batch)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[index]
            elif isinstance(v, dict):
                out[f.name] = {k: t[index] for k, t in v.items()}
            elif isinstance(v, list):
                rows = range(len(v))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
                out[f.name] = [v[i] for i in rows]
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def to(self, device: torch.device | str) -> RolloutBatch:
        changes = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        changes["extras"] = {k: t.to(device) for k, t in self.extras.items()}
        return replace(self, **changes)

    def split(self, micro_batch_size: int) -> list[RolloutBatch]:
        return [self.select(slice(i, i + micro_batch_size)) for i in range(0, self.num_sequences, micro_batch_size)]

    def trim_padding(self) -> RolloutBatch:
        """Drop the columns that are padding in every row: leading prompt columns and trailing response columns
        (also of the privileged teacher layout and of every ``[N, R]`` per-token field). Positions come from the
        attention mask, so the model sees the same real tokens: results are unchanged, only the width shrinks."""
        if self.num_sequences == 0:
            return self
        R = self.response_len
        real = self.response_mask.bool().any(0).nonzero()
        r_keep = max(1, int(real[-1]) + 1) if real.numel() else 1

        def lead(mask: Tensor, p: int) -> int:  # all-pad leading prompt columns; keep >= 1 prompt column
            cols = mask[:, :p].bool().any(0).nonzero()
            return min(int(cols[0]) if cols.numel() else p, p - 1)

        changes: dict = {}
        cut = lead(self.attention_mask, self.prompt_len)
        changes.update(input_ids=self.input_ids[:, cut:self.prompt_len + r_keep],
                       attention_mask=self.attention_mask[:, cut:self.prompt_len + r_keep],
                       prompt_len=self.prompt_len - cut)
        if self.teacher_input_ids is not None:
            tp = self.teacher_prompt_len
            tcut = lead(self.teacher_attention_mask, tp)
            changes.update(teacher_input_ids=self.teacher_input_ids[:, tcut:tp + r_keep],
                           teacher_attention_mask=self.teacher_attention_mask[:, tcut:tp + r_keep],
                           teacher_prompt_len=tp - tcut)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in changes and isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == R:
                changes[f.name] = v[:, :r_keep]
        return replace(self, **changes)


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step, with the loss denominators counted over all of them and all ranks.

    The pipeline also hands over what the trainer logs and divides by, so the module never reads the data side:
    ``max_response_len`` (the sampling limit, Dr. GRPO's constant ``L_max``), and on the first step of a rollout
    batch its statistics (``stats``: ``rollout/*``, ``timing/*``, ``nonfinite/*`` counts) and text ``samples``.
    """

    micro_batches: list[RolloutBatch]
    max_response_len: Optional[int] = None
    stats: Optional[dict[str, float]] = None
    samples: Optional[list[tuple[str, str, float]]] = None

    def to(self, device) -> StepBatch:
        return replace(self, micro_batches=[mb.to(device) for mb in self.micro_batches])

    @property
    def num_sequences(self) -> int:
        return sum(mb.num_sequences for mb in self.micro_batches)

    @property
    def num_tokens(self) -> float:
        return float(sum(mb.response_mask.sum().item() for mb in self.micro_batches))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that start at 0 on the first real token of each (left-padded) row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def pad_rows(rows: list[list[int]], pad_id: int, side: str, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad lists of token ids into ``(ids [N, L], mask [N, L])`` on the ``left`` or ``right``."""
    length = max((len(r) for r in rows), default=0) if length is None else length
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:length]
        if not r:
            continue
        if side == "left":
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        else:
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
    return ids, mask


def build_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int
                    ) -> tuple[Tensor, Tensor, int, Tensor]:
    """Lay out ``[left-padded prompt | right-padded response]``: returns ids, attention mask, P, response mask."""
    p_ids, p_mask = pad_rows(prompts, pad_id, "left")
    r_ids, r_mask = pad_rows(responses, pad_id, "right", length=max(1, max((len(r) for r in responses), default=1)))
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1], r_mask.float()


def pad_rows_float(rows: list[list[float]], length: int) -> Tensor:
    """Right-pad float rows (engine log-probs) with zeros into ``[N, length]`` (longer rows are cut)."""
    out = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out
