"""Entropy-gated length curriculum (docs/methods/curriculum.md) as a Lightning ``Callback``.

Train at the response length ``ladder[m]`` for ``epochs_per_stage`` rollout batches, then measure the student's mean
per-token predictive entropy on held-out prompts::

    H = mean over response tokens t of  -sum_v q(v | s_t) log q(v | s_t)

(the student teacher-forced on its own samples of held-out prompts, prompt tokens excluded). Advance to
``ladder[m+1]`` only if ``H >= h_min``; after the first failed gate stay at ``ladder[m]`` for the rest of training
and never advance again. ``h_min`` defaults to ``h_min_ratio * H_0`` with ``H_0`` measured before training.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from rlad_pl.core.batch import build_sequences
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import response_logprobs


def gate(entropy: float, h_min: float, stage: int, num_stages: int, frozen: bool) -> tuple[int, bool]:
    """One curriculum decision -> ``(new_stage, frozen)``: advance iff ``entropy >= h_min`` and a next stage
    exists; a failed gate freezes the stage for good."""
    if frozen:
        return stage, True
    if entropy >= h_min:
        return (stage + 1, False) if stage + 1 < num_stages else (stage, False)
    return stage, True


@torch.no_grad()
def heldout_entropy(module, datamodule, num_prompts: int, max_new_tokens: int, seed: int = 0) -> float:
    """Mean token entropy of the student on its own samples of ``num_prompts`` validation prompts."""
    problems = datamodule.eval_problems("val")[:num_prompts]
    pipeline = datamodule.pipeline
    prompt_ids, _ = pipeline.encode_prompts(problems)
    pipeline.sync(module.global_step)
    params = datamodule.sampling.with_(n=1, max_new_tokens=max_new_tokens, seed=seed)
    gen = datamodule.sampler.generate(prompt_ids, params)
    ids, mask, P, rmask = build_sequences(prompt_ids, gen.completion_ids, pipeline.tokenizer.pad_token_id)
    dev = module.device
    was_training = module.student.training
    module.student.eval()
    try:
        _, ent = response_logprobs(module.student, ids.to(dev), mask.to(dev), P, temperature=module.temperature,
                                   chunk_size=module.chunk_size, with_entropy=True, vocab_size=module.vocab_size)
    finally:
        module.student.train(was_training)
    rmask = rmask.to(dev)
    return float((ent * rmask).sum() / rmask.sum().clamp_min(1))


class LengthCurriculum(L.Callback):
    """Grow ``data.sampling.max_new_tokens`` along ``ladder`` while held-out entropy stays >= ``h_min``.

    Args:
        ladder: response-length stages, increasing (default 128 -> 4096).
        epochs_per_stage: rollout batches trained at each length before the gate.
        h_min: absolute entropy threshold (nats); default ``h_min_ratio * H_0``.
        h_min_ratio: used when ``h_min`` is None; ``H_0`` is measured at the first length before training.
        heldout_prompts: validation prompts used for the entropy measurement.
    """

    def __init__(self, ladder: list[int] = (128, 256, 512, 1024, 2048, 4096), epochs_per_stage: int = 10,
                 h_min: Optional[float] = None, h_min_ratio: float = 0.5, heldout_prompts: int = 32):
        ladder = list(ladder)
        if not ladder or any(b <= a for a, b in zip(ladder, ladder[1:])) or ladder[0] < 1:
            raise ConfigError("curriculum.ladder", f"expected increasing positive lengths, got {ladder}")
        if epochs_per_stage < 1:
            raise ConfigError("curriculum.epochs_per_stage", f"expected >= 1, got {epochs_per_stage}")
        self.ladder, self.epochs_per_stage = ladder, epochs_per_stage
        self.h_min, self.h_min_ratio, self.heldout_prompts = h_min, h_min_ratio, heldout_prompts
        self.stage, self.frozen = 0, False
        self.history: list[tuple[int, int, float]] = []  # (epoch, length, entropy)

    def _set_length(self, trainer) -> None:
        settings = trainer.datamodule.settings  # the rollout pipeline reads it at every rollout batch
        settings.sampling = settings.sampling.with_(max_new_tokens=self.ladder[self.stage])

    def _log(self, trainer, entropy: float) -> None:
        metrics = {"curriculum/stage": float(self.stage), "curriculum/max_new_tokens": float(self.ladder[self.stage]),
                   "curriculum/heldout_entropy": entropy, "curriculum/frozen": float(self.frozen)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before the first rollout batch is sampled
            self._set_length(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        h0 = heldout_entropy(pl_module, trainer.datamodule, self.heldout_prompts, self.ladder[self.stage])
        if self.h_min is None:
            self.h_min = self.h_min_ratio * h0
        self.history.append((-1, self.ladder[self.stage], h0))
        self._log(trainer, h0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.epochs_per_stage:
            return  # (entropy is still measured and logged after a failed gate; the length no longer changes)
        length = self.ladder[self.stage]
        h = heldout_entropy(pl_module, trainer.datamodule, self.heldout_prompts, length)
        self.history.append((trainer.current_epoch, length, h))
        self.stage, self.frozen = gate(h, self.h_min, self.stage, len(self.ladder), self.frozen)
        self._set_length(trainer)
        self._log(trainer, h)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "frozen": self.frozen, "h_min": self.h_min}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.frozen, self.h_min = state["stage"], state["frozen"], state["h_min"]
