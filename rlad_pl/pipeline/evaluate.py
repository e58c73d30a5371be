"""Held-out evaluation: ``EvalResult`` (what the pipeline's ``evaluate`` returns), ``evaluate_policy`` (the same
metrics for a model outside any trainer: model cards, tests) and ``accuracy_table``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlad_pl.core.metrics import MeanPassAtK
from rlad_pl.data.prompts import PromptFormat, encode_prompt
from rlad_pl.data.tasks import Split, Task
from rlad_pl.rollout.hf import HFSampler
from rlad_pl.rollout.sampler import SamplingParams


@dataclass
class EvalResult:
    """``k`` scored samples for each of ``P`` problems."""

    scores: torch.Tensor  # [P, k] verifier scores
    lengths: torch.Tensor  # [P, k] response lengths in tokens
    truncated: torch.Tensor  # [P, k] bool
    difficulties: list[Optional[str]]
    correct: Optional[torch.Tensor] = None  # [P, k] bool: score >= the correct threshold


@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, tokenizer, task: Task, split: Split = "test", count: int = 512,
                    k: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                    pass_k: Optional[list[int]] = None, seed: int = 0, batch_size: int = 128,
                    prompt_format: Optional[PromptFormat] = None) -> dict[str, float]:
    """Mean@k / Pass@k (overall and per difficulty) and mean response length of ``model`` on ``count`` problems.

    ``temperature=0`` is greedy decoding (then ``k`` should be 1: Mean@1 = accuracy). Prompts are encoded exactly
    like the data module does (``encode_prompt`` with ``prompt_format``; default: the chat template when the
    tokenizer has one, else BOS + text).
    """
    problems = task.problems(split, count, offset=0)
    buckets = sorted({p.difficulty for p in problems if p.difficulty is not None})
    ks = sorted(set(pass_k or [1, k]))
    metric = MeanPassAtK(k, ks, buckets)
    sampler = HFSampler(batch_size=batch_size * k)  # batch_size: prompts per call; the sampler counts sequences
    sampler.setup(model, tokenizer)
    prompt_ids = [encode_prompt(tokenizer, p.prompt, prompt_format) for p in problems]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=k, seed=seed)
    gen = sampler.generate(prompt_ids, params)
    texts = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
    scores = torch.tensor([task.verify(t, problems[i // k]) for i, t in enumerate(texts)]).view(-1, k)
    idx = torch.tensor([metric.bucket_index(p.difficulty) for p in problems], dtype=torch.long)
    metric.update(scores >= 1.0, idx)
    out = {name: float(v) for name, v in metric.compute().items()}
    out["response_length_mean"] = float(sum(len(c) for c in gen.completion_ids) / max(len(gen.completion_ids), 1))
    return out


def accuracy_table(results: dict[str, dict[str, float]], metric: str = "mean@1", scale: float = 100.0) -> str:
    """Markdown table: one row per model in ``results``, one column per difficulty bucket, then ``all``."""
    buckets = sorted({k.split("/")[0] for r in results.values() for k in r if "/" in k} - {"all"})
    head = "| model | " + " | ".join(buckets) + " | **all** |\n|---|" + "---|" * (len(buckets) + 1) + "\n"
    rows = []
    for name, r in results.items():
        cells = [f"{scale * r[f'{b}/{metric}']:.1f}" if f"{b}/{metric}" in r else "" for b in buckets]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{scale * r[f'all/{metric}']:.1f}** |")
    return head + "\n".join(rows) + "\n"
