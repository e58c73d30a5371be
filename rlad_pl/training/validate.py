"""Evaluation helpers for demos and model cards.

* ``ValidateAtStart``: a Lightning callback that runs the data module's validation (Mean@k, Pass@k per difficulty
  bucket, mean response length) once before the first optimizer step and logs it at step 0 under the same tags as
  the regular validation (``val/all/mean@k``, ``val/<bucket>/pass@k``, ``val/response_length_mean``), so every
  run has a "before" point and TensorBoard curves start at 0. Enable it with ``--trainer.callbacks+=
  rlad_pl.training.validate.ValidateAtStart`` or in YAML under ``trainer.callbacks``.
* ``evaluate_policy``: the same metrics for a model outside a trainer (model cards, tests): ``HFSampler`` +
  ``Task.verify`` + ``MeanPassAtK``.
"""

from __future__ import annotations

import time
from typing import Optional

import lightning as L
import torch

from rlad_pl.data.prompts import PromptFormat, encode_prompt
from rlad_pl.data.tasks import Split, Task
from rlad_pl.core.metrics import MeanPassAtK
from rlad_pl.rollout.hf import HFSampler
from rlad_pl.rollout.sampler import SamplingParams


class ValidateAtStart(L.Callback):
    """Run the validation metrics once at the start of ``fit`` (before any update) and log them at step 0.

    Args:
        enabled: set False to skip.
        prefix: tag prefix (default ``val``: the same tags as the trainer's validation, so "before" and "after"
            values sit on one curve).
    """

    def __init__(self, enabled: bool = True, prefix: str = "val"):
        self.enabled, self.prefix = enabled, prefix
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        dm = getattr(trainer, "datamodule", None)
        if not self.enabled or dm is None or not hasattr(dm, "evaluate") or pl_module.val_metric is None:
            return
        t0 = time.perf_counter()
        metric = pl_module.val_metric
        metric.reset()
        rank, world = trainer.global_rank, trainer.world_size
        problems = dm.eval_problems("val")[rank::world]
        lengths = []
        for s in range(0, len(problems), dm.val_batch_prompts):
            res = dm.evaluate(problems[s:s + dm.val_batch_prompts])
            correct = res.scores >= dm.correct_threshold
            idx = torch.tensor([metric.bucket_index(d) for d in res.difficulties], dtype=torch.long)
            metric.update(correct.to(pl_module.device), idx.to(pl_module.device))
            lengths.append(res.lengths.mean())
        values = {f"{self.prefix}/{k}": float(v) for k, v in metric.compute().items()}
        metric.reset()
        if lengths:
            values[f"{self.prefix}/response_length_mean"] = float(torch.stack(lengths).mean())
        values["timing/validate_at_start"] = time.perf_counter() - t0
        self.metrics = values
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)


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
