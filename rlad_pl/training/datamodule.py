"""``RolloutDataModule``: a thin Lightning adapter over the rollout pipeline (``rlad_pl.pipeline``).

One epoch = one rollout batch: the trainer asks for ``train_dataloader`` every epoch (the CLI reloads loaders every
epoch) and gets the ``steps_per_rollout * ppo_epochs`` optimizer steps that ``RolloutPipeline.steps`` makes for
this rank. Validation batches are scored problems (``EvalResult``) that ``RolloutPipeline.evaluate`` samples. The
data module never calls the ``LightningModule``: the models reach the pipeline through ``connect`` (called by the
``RolloutLink`` callback, ``rlad_pl.training.link``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlad_pl.core.batch import StepBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_int
from rlad_pl.data.prompts import PromptFormat
from rlad_pl.data.tasks import Problem, Task
from rlad_pl.pipeline import EvalResult, Policy, RolloutPipeline, RolloutSettings
from rlad_pl.pipeline.scoring import Reward
from rlad_pl.rollout.sampler import Sampler, SamplingParams
from rlad_pl.training.state import rng_state, set_rng_state


def _identity(x):
    return x


class RolloutDataModule(L.LightningDataModule):
    """On-policy rollout data.

    Args:
        task: where prompts and verifiers come from (``class_path`` of a ``Task``).
        sampler: rollout engine; default: Hugging Face decoding on the student (``HFSampler``).
        reward: optional callable ``(completion, problem) -> float`` replacing the task's verifier for training.
        prompts_per_rollout: prompts per rollout batch (per rank).
        group_size: responses per prompt (G); group-normalized objectives need G >= 2.
        micro_batch_size: sequences per forward/backward pass.
        steps_per_rollout: optimizer steps (mini-batches) per rollout batch and PPO epoch.
        ppo_epochs: passes over each rollout batch.
        sampling: decoding settings for training rollouts (``n`` is set to ``group_size``).
        scale_std_advantages: divide advantages by the group std (False: Dr. GRPO).
        max_prompt_length: prompts longer than this keep their last tokens (counted in ``rollout/prompt_truncated``).
        val_prompts: held-out prompts per validation (all ranks together).
        val_k: samples per validation prompt (Mean@k, Pass@k).
        val_sampling: decoding settings for validation (default: training settings).
        pass_k: the k values of Pass@k reported (each <= val_k).
        correct_threshold: a verifier score at or above this counts as correct in Mean@k / Pass@k.
        val_batch_prompts: prompts per validation batch.
        log_samples: rollouts logged as text per epoch.
        seed: base seed of the rollout sampling.
        teacher_sampler: engine for teacher-prefix objectives (default: Hugging Face decoding on the teacher).
        teacher_cache_dir: cache teacher-sampled responses on disk and reuse them across epochs and runs.
        seed_per_prompt: sample each prompt's group in its own engine call, seeded by the prompt's global index
            (``seed + index``), so training rollouts do not depend on the number of ranks or on
            ``prompts_per_rollout`` (layout-equivalence tests, reproducible reruns on other hardware layouts).
            Slower: one engine call per prompt. Default off: one call per rank, seeded by epoch and rank.
        group_by_length: order the sequences of each optimizer step by length before cutting micro-batches (the
            step's loss and gradient are unchanged; micro-batches of similar length pad less). Micro-batches are
            always trimmed to their own longest prompt and response.
        prompt_format: how prompt text becomes token ids (chat template, system prompt, template kwargs, raw);
            the same settings encode the teacher's privileged prompt (``rlad_pl.data.prompts.PromptFormat``).
        max_off_policy_steps: asynchronous rollouts (docs/async.md): each rollout batch is sampled from the student's
            weights of exactly this many optimizer steps before its first update (fewer at the start of a run), on
            the sampler's servers while the trainer trains; a batch that is not ready is waited for, never dropped.
            0 (default): synchronous. Needs ``ServerSampler`` (or ``StaleSampler`` for studies).
    """

    def __init__(self, task: Task, sampler: Optional[Sampler] = None, reward: Optional[Reward] = None,
                 prompts_per_rollout: int = 8, group_size: int = 8, micro_batch_size: int = 16,
                 steps_per_rollout: int = 1, ppo_epochs: int = 1, sampling: Optional[SamplingParams] = None,
                 scale_std_advantages: bool = True, max_prompt_length: int = 1024, val_prompts: int = 64,
                 val_k: int = 4, val_sampling: Optional[SamplingParams] = None, pass_k: Optional[list[int]] = None,
                 correct_threshold: float = 1.0, val_batch_prompts: int = 64, log_samples: int = 4, seed: int = 0,
                 teacher_sampler: Optional[Sampler] = None, teacher_cache_dir: Optional[str] = None,
                 seed_per_prompt: bool = False,
                 group_by_length: bool = False, prompt_format: Optional[PromptFormat] = None,
                 max_off_policy_steps: int = 0):
        super().__init__()
        check_int("data.val_prompts", val_prompts, hint=" (to skip validation set trainer.limit_val_batches: 0)")
        check_int("data.val_batch_prompts", val_batch_prompts)
        for k in pass_k or []:
            check_int("data.pass_k", k, hint=f" in {pass_k}")
        limit = getattr(sampler, "max_model_len", None)
        for name, params in (("sampling", sampling), ("val_sampling", val_sampling)):
            if params and isinstance(limit, int) and params.max_new_tokens >= limit:
                raise ConfigError(f"data.{name}.max_new_tokens", f"{params.max_new_tokens} leaves no room for a "
                                  f"prompt within data.sampler.init_args.max_model_len={limit}")
        if reward is not None and not callable(reward):
            raise ConfigError("data.reward", f"expected a callable (completion, problem) -> float, got {reward!r}")
        self.settings = RolloutSettings(
            prompts_per_rollout=prompts_per_rollout, group_size=group_size, micro_batch_size=micro_batch_size,
            steps_per_rollout=steps_per_rollout, ppo_epochs=ppo_epochs, sampling=sampling or SamplingParams(),
            scale_std_advantages=scale_std_advantages, max_prompt_length=max_prompt_length,
            correct_threshold=correct_threshold, log_samples=log_samples, seed=seed, seed_per_prompt=seed_per_prompt,
            group_by_length=group_by_length, prompt_format=prompt_format or PromptFormat(), val_k=val_k,
            val_sampling=val_sampling, max_off_policy_steps=max_off_policy_steps)
        self.pass_k = sorted(set(pass_k or [1, val_k]))
        if self.pass_k[-1] > val_k:
            raise ConfigError("data.pass_k", f"every k must be <= val_k={val_k}, got {self.pass_k}")
        from lightning.pytorch.utilities import rank_zero_info

        self.pipeline = RolloutPipeline(task, self.settings, sampler=sampler, reward=reward,
                                        teacher_sampler=teacher_sampler, teacher_cache_dir=teacher_cache_dir,
                                        info=rank_zero_info)
        self.task, self.reward, self.val_prompts, self.val_batch_prompts = task, reward, val_prompts, val_batch_prompts

    # --------------------------------------------------------------------------------- what the link reads
    @property
    def sampler(self) -> Sampler:
        return self.pipeline.sampler

    @property
    def teacher_sampler(self) -> Optional[Sampler]:
        return self.pipeline.teacher_sampler

    @property
    def sampling(self) -> SamplingParams:
        return self.settings.sampling

    @property
    def group_size(self) -> int:
        return self.settings.group_size

    @property
    def val_k(self) -> int:
        return self.settings.val_k

    @property
    def correct_threshold(self) -> float:
        return self.settings.correct_threshold

    @property
    def updates_per_rollout(self) -> int:
        return self.settings.updates_per_rollout

    @property
    def rollout_stats(self) -> dict[str, float]:
        """The last rollout batch's statistics (``rollout/*``, ``timing/*``)."""
        return self.pipeline.stats

    @property
    def samples(self) -> list[tuple[str, str, float]]:
        return self.pipeline.samples

    def connect(self, policy: Policy) -> None:
        """Give the pipeline the models it samples from and scores with (``RolloutLink`` calls this)."""
        self.pipeline.connect(policy)

    # ----------------------------------------------------------------------------------------------- training
    def train_dataloader(self) -> DataLoader:
        """The optimizer steps of this epoch's rollout batch, built on first access (``LazySteps``): Lightning also
        asks for a loader before restoring a checkpoint's epoch counter and then replaces it unused, so nothing is
        sampled or scored for it."""
        return DataLoader(LazySteps(self.build_steps, self.updates_per_rollout), batch_size=None, shuffle=False,
                          collate_fn=_identity)

    def build_steps(self) -> list[StepBatch]:
        t = self.trainer
        return self.pipeline.steps(t.current_epoch, t.global_rank, t.world_size, t.global_step)

    def after_step(self, epoch: int, batch_idx: int, step: int) -> None:
        """The trainer finished an optimizer step (``RolloutLink``): asynchronous rollouts due now start."""
        self.pipeline.after_step(epoch, batch_idx, step)

    def last_epoch(self, epoch: Optional[int]) -> None:
        """The run's last epoch: no asynchronous rollout is sampled past it."""
        if self.pipeline.asynchronous is not None:
            self.pipeline.asynchronous.last_epoch = epoch

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if isinstance(batch, StepBatch):
            return batch.to(device)
        return batch  # validation batches are scored problems (EvalResult), moved by the metric update

    def state_dict(self) -> dict:
        """Saved in checkpoints. The position in the task is the trainer's epoch; this adds the random generators
        (rollout seeds are derived from ``seed`` and the epoch, but other code may draw from the global ones)."""
        return {"seed": self.settings.seed, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            set_rng_state(state["rng"])

    def teardown(self, stage: str) -> None:
        """Release engines that hold resources (a vLLM engine) at the end of a stage."""
        self.pipeline.close()

    # ----------------------------------------------------------------------------------------------- evaluation
    def eval_problems(self, split: str) -> list[Problem]:
        return self.task.problems(split, self.val_prompts, offset=0)

    def buckets(self, split: str = "val") -> list[str]:
        return sorted({p.difficulty for p in self.eval_problems(split) if p.difficulty is not None})

    def evaluate(self, problems: list[Problem], params: Optional[SamplingParams] = None) -> EvalResult:
        """``val_k`` scored samples per problem from the student as it is now."""
        return self.pipeline.evaluate(problems, self.trainer.global_step, params)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.eval_problems(split)[rank::world]
        chunks = [mine[i:i + self.val_batch_prompts] for i in range(0, len(mine), self.val_batch_prompts)]
        return DataLoader(LazyEval(chunks, self.evaluate), batch_size=None, shuffle=False, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class LazySteps(torch.utils.data.Dataset):
    """``n`` optimizer steps whose list ``build()`` makes on the first ``__getitem__`` (``len`` needs no build)."""

    def __init__(self, build: Callable[[], list[StepBatch]], n: int):
        self.build, self.n, self.steps = build, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> StepBatch:
        if self.steps is None:
            self.steps = self.build()
            if len(self.steps) != self.n:
                raise RuntimeError(f"built {len(self.steps)} optimizer steps, expected {self.n}")
        return self.steps[i]


class LazyEval(torch.utils.data.Dataset):
    """Validation batches: each chunk of problems is sampled and scored when the loop asks for it."""

    def __init__(self, chunks: list[list[Problem]], evaluate: Callable[[list[Problem]], EvalResult]):
        self.chunks, self.evaluate = chunks, evaluate

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> EvalResult:
        return self.evaluate(self.chunks[i])


__all__ = ["RolloutDataModule", "EvalResult", "LazySteps"]
