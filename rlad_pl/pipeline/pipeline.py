"""``RolloutPipeline``: problems -> responses -> scores -> advantages -> ``RolloutBatch`` -> annotation -> steps.

Plain Python: no Lightning import, no trainer, no module. The training side builds a ``Policy`` once (the student
to sample from, its tokenizer, the ``Annotator`` over its frozen models, the objectives' plan) and ``connect``s it;
``RolloutDataModule`` then only asks ``steps(epoch, rank, world, step)`` for each epoch's optimizer steps and
``evaluate(problems, step)`` for validation. A test drives the same calls without a ``Trainer``
(``tests/test_pipeline.py``). Read top to bottom, one rollout batch is:

1. ``problems``: the rank's ``prompts_per_rollout`` training problems (the next batch's are prefetched in a thread
   for tasks that declare ``prefetch_safe``);
2. ``sync``: the student's weights into the sampler, once per optimizer step (``timing/weight_sync``, ``sync/*``);
3. ``generate``: ``group_size`` responses per prompt from the plan's response source: the student's sampler, the
   frozen teacher's sampler (with an optional on-disk cache) or the task's reference solutions;
4. ``score`` with the task's verifier (or ``data.reward``), group-normalized ``advantages``;
5. lay out the ``RolloutBatch`` (plus the privileged teacher layout for OPSD, the sampler's log-probs);
6. ``annotate``: old / reference / teacher log-probs (``Annotator``);
7. ``make_steps``: optimizer steps of micro-batches; the first carries the batch's statistics and text samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlad_pl.core.advantages import group_advantages, zero_variance_fraction
from rlad_pl.core.batch import RolloutBatch, StepBatch, build_sequences, pad_rows_float
from rlad_pl.core.errors import ConfigError
from rlad_pl.data.prompts import encode_prompt
from rlad_pl.data.tasks import Problem, Task
from rlad_pl.objectives.plan import ObjectivePlan
from rlad_pl.pipeline.annotator import Annotator
from rlad_pl.pipeline.asynchronous import AsyncRollouts
from rlad_pl.pipeline.evaluate import EvalResult
from rlad_pl.pipeline.scoring import Reward, score_completions
from rlad_pl.pipeline.settings import RolloutSettings
from rlad_pl.pipeline.steps import make_steps
from rlad_pl.rollout.cache import GenerationCache
from rlad_pl.rollout.hf import HFSampler
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams


@dataclass
class Policy:
    """What the training side hands the pipeline, once: the models it samples from and scores with."""

    student: torch.nn.Module
    tokenizer: Any
    annotator: Annotator
    plan: ObjectivePlan
    #: the frozen teacher as a model in the trainer (teacher-prefix sampling); None when it lives elsewhere
    teacher: Optional[torch.nn.Module] = None
    #: exactly which teacher files were loaded (``org/name@<commit>``): the teacher cache's key
    teacher_tag: Optional[str] = None
    #: named teachers in routing order (``model.teachers``): ``RolloutBatch.teacher_ids`` indexes this list
    teacher_names: Optional[list[str]] = None
    default_teacher: Optional[str] = None
    #: a teacher with another tokenizer re-encodes the prompt text: the batch carries it
    needs_prompt_texts: bool = False


@dataclass
class Rollout:
    """One scored, laid-out rollout batch and what to log about it."""

    batch: RolloutBatch
    stats: dict[str, float]
    samples: list[tuple[str, str, float]]


class RolloutPipeline:
    """See the module docstring. ``sampler`` defaults to Hugging Face decoding on the student (``HFSampler``)."""

    def __init__(self, task: Task, settings: RolloutSettings, sampler: Optional[Sampler] = None,
                 reward: Optional[Reward] = None, teacher_sampler: Optional[Sampler] = None,
                 teacher_cache_dir: Optional[str] = None, info: Callable[[str], None] = print):
        self.task, self.settings, self.reward = task, settings, reward
        self.sampler = sampler if sampler is not None else HFSampler()
        self.teacher_sampler, self.teacher_cache_dir = teacher_sampler, teacher_cache_dir
        self.info = info
        self.policy: Optional[Policy] = None
        #: the last rollout batch's statistics and text samples (also handed to the trainer with its first step)
        self.stats: dict[str, float] = {}
        self.samples: list[tuple[str, str, float]] = []
        self._sampler_ready = self._teacher_ready = self._shown_prompt = False
        self._synced_at_step = -1
        self._teacher_cache: Optional[GenerationCache] = None
        self._next_problems = None  # (offset, count, Future): the next rollout's problems, prepared in a thread
        self._prefetcher: Optional[ThreadPoolExecutor] = None
        k = settings.max_off_policy_steps
        AsyncRollouts.check(k, self.sampler)
        #: ``max_off_policy_steps > 0``: rollouts sampled ahead from earlier weights (``rlad_pl.pipeline.asynchronous``)
        self.asynchronous: Optional[AsyncRollouts] = AsyncRollouts(self, k) if k else None

    # ------------------------------------------------------------------------------------------------ wiring
    def connect(self, policy: Policy) -> None:
        """Take the training side's models. The prompt format is tried on the tokenizer here, so a chat setting
        with no template, or a template that fails to render, is one line before any compute."""
        self.policy = policy
        AsyncRollouts.check(self.settings.max_off_policy_steps, self.sampler, policy.plan.responses)
        self.encode_prompt("1+1=")

    @property
    def tokenizer(self):
        if self.policy is None:
            raise RuntimeError("RolloutPipeline: connect(policy) first")
        return self.policy.tokenizer

    @property
    def responses(self) -> str:
        return self.policy.plan.responses

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.settings.prompt_format)

    def prompt_text(self, ids: list[int]) -> str:
        """A prompt as the model sees it (template and special tokens included), for logs."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_prompts(self, problems: list[Problem]) -> tuple[list[list[int]], int]:
        ids = [self.encode_prompt(p.prompt) for p in problems]
        if ids and not self._shown_prompt:  # a template's default system prompt shows here
            self.info(f"rlad_pl: first prompt as encoded for the model: {self.prompt_text(ids[0])!r}")
            self._shown_prompt = True
        limit = self.settings.max_prompt_length
        return [x[-limit:] for x in ids], sum(len(x) > limit for x in ids)

    # ------------------------------------------------------------------------------------------------ 1. problems
    def problems(self, offset: int) -> list[Problem]:
        """The ``prompts_per_rollout`` training problems from ``offset``: the prefetched list when it is the one
        asked for (the same call, made earlier in a thread), else computed now."""
        count = self.settings.prompts_per_rollout
        pending, self._next_problems = self._next_problems, None
        if pending is not None and pending[:2] == (offset, count):
            return pending[2].result()  # an exception of the task's problems() surfaces here, as if called now
        return self.task.problems("train", count, offset=offset)

    def prefetch(self, offset: int) -> None:
        """Compute the next rollout's problems in a background thread while this one trains (tasks that declare
        ``prefetch_safe``: pure ``problems``; problem generation is Python on the critical path otherwise)."""
        if not getattr(self.task, "prefetch_safe", False):
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlad_pl-problems")
        count = self.settings.prompts_per_rollout
        self._next_problems = (offset, count, self._prefetcher.submit(self.task.problems, "train", count,
                                                                      offset=offset))

    # ------------------------------------------------------------------------------------------------ 2-3. responses
    def sync(self, step: int, setup_only: bool = False) -> dict[str, float]:
        """The student's current weights into the sampler, once per optimizer step ``step`` (``setup_only``: only
        set the sampler up)."""
        student = self.policy.student
        if not self._sampler_ready:
            self.sampler.setup(student, self.tokenizer)
            self._sampler_ready = True
        if setup_only or self._synced_at_step == step:
            return {}
        t0 = time.perf_counter()
        stats = self.sampler.sync_weights(student)
        self._synced_at_step = step
        return {"timing/weight_sync": time.perf_counter() - t0, **{f"sync/{k}": v for k, v in stats.items()}}

    def forget_sync(self) -> None:
        """The sampler now holds other weights (an asynchronous snapshot): the next ``sync`` pushes again."""
        self._synced_at_step = -1

    def _dataset_responses(self, problems: list[Problem], n: int) -> Generation:
        """The reference solutions as responses (``n`` copies per problem), ``eos`` appended, cut at max length."""
        tok, limit = self.tokenizer, self.settings.sampling.max_new_tokens
        rows, finished = [], []
        for p in problems:
            if p.solution is None:
                raise ConfigError(f"{self.task.field}.solution_template", "a dataset-prefix objective trains on "
                                  f"reference solutions, but problem '{p.prompt[:40]}' has none")
            ids = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows += [ids[:limit]] * n
            finished += [len(ids) <= limit] * n
        return Generation(rows, finished)

    def _teacher_generate(self, prompt_ids: list[list[int]], params: SamplingParams
                          ) -> tuple[Generation, dict[str, float]]:
        if self.policy.teacher is None:
            raise ConfigError("model.teacher", "teacher-prefix objectives sample from the teacher; set model.teacher")
        if not self._teacher_ready:
            self.teacher_sampler = self.teacher_sampler or HFSampler()
            self.teacher_sampler.setup(self.policy.teacher, self.tokenizer)
            self.teacher_sampler.sync_weights(self.policy.teacher)  # frozen: one sync is enough
            if self.teacher_cache_dir:
                self._teacher_cache = GenerationCache(self.teacher_cache_dir, tag=self.policy.teacher_tag)
            self._teacher_ready = True
        if self._teacher_cache is None:
            return self.teacher_sampler.generate(prompt_ids, params), {}
        gen = self._teacher_cache.get_or_generate(prompt_ids, params, self.teacher_sampler.generate)
        return gen, {"rollout/teacher_cache_hits": float(self._teacher_cache.hits)}

    def generate(self, problems: list[Problem], prompt_ids: list[list[int]], params: SamplingParams
                 ) -> tuple[Generation, dict[str, float]]:
        """Responses from the plan's source: the student's sampler (synced), the teacher, or the dataset."""
        if self.responses == "student":
            return self.sampler.generate(prompt_ids, params), {}
        if self.responses == "dataset":
            return self._dataset_responses(problems, params.n), {}
        return self._teacher_generate(prompt_ids, params)

    def _generate_per_prompt(self, problems: list[Problem], prompt_ids: list[list[int]], first_index: int
                             ) -> tuple[Generation, dict[str, float]]:
        """``seed_per_prompt``: one engine call per prompt, seeded by the prompt's global index."""
        rows, finished, logprobs, stats = [], [], [], {}
        for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
            params = self.settings.sampling.with_(seed=self.settings.seed + first_index + i)
            gen, stats = self.generate([problem], [ids], params)
            rows += gen.completion_ids
            finished += gen.finished
            logprobs = None if gen.logprobs is None or logprobs is None else logprobs + gen.logprobs
        return Generation(rows, finished, logprobs), stats

    # ------------------------------------------------------------------------------------------------ 4-5. batch
    def score(self, completions: list[str], problems: list[Problem]) -> torch.Tensor:
        if self.reward is not None:
            return score_completions(self.reward, "data.reward", completions, problems)
        return score_completions(self.task.verify, f"{self.task.field}.verify", completions, problems)

    def _privileged_layout(self, problems: list[Problem], responses: list[list[int]]):
        """``[left-padded privileged prompt | same response tokens]`` for the teacher (OPSD)."""
        missing = [p.prompt[:40] for p in problems if p.privileged is None]
        if missing:
            raise ConfigError(f"{self.task.field}.privileged_template", "the objective scores responses under a "
                              f"privileged prompt, but problem '{missing[0]}' has none (set the task's privileged "
                              "template / field)")
        priv = [self.encode_prompt(p.privileged)[-self.settings.max_prompt_length:] for p in problems]
        ids, mask, P, _ = build_sequences([x for x in priv for _ in range(self.settings.group_size)], responses,
                                          self.tokenizer.pad_token_id)
        return ids, mask, P

    def _teacher_ids(self, problems: list[Problem]) -> torch.Tensor:
        """Each problem's teacher as an index into ``policy.teacher_names`` (one line for a routing value that
        names no teacher)."""
        names, default = self.policy.teacher_names, self.policy.default_teacher
        default = default if default is not None else (names[0] if len(names) == 1 else None)
        ids = []
        for p in problems:
            name = p.teacher if p.teacher is not None else default
            if name not in names:
                raise ConfigError(self.task.field, f"problem {p.prompt[:40]!r} routes to teacher {name!r}, which is "
                                  f"not among the routed teachers ({', '.join(names)}; set model.default_teacher "
                                  "for problems that name none)")
            ids.append(names.index(name))
        return torch.tensor(ids, dtype=torch.long)

    def rollout(self, problems: list[Problem], seed: int, step: int, first_index: int = 0, sync: bool = True
                ) -> Rollout:
        """Sample, score and lay out one rollout batch (steps 2-5). ``first_index``: global index of
        ``problems[0]`` (``seed_per_prompt``); ``step``: the optimizer steps taken (the weight version); ``sync``
        False: the sampler already holds the weights to sample from (asynchronous rollouts)."""
        cfg, G = self.settings, self.settings.group_size
        stats = self.sync(step) if sync and self.responses == "student" else {}
        prompt_ids, cut = self.encode_prompts(problems)
        t0 = time.perf_counter()
        if cfg.seed_per_prompt:
            gen, gen_stats = self._generate_per_prompt(problems, prompt_ids, first_index)
        else:
            gen, gen_stats = self.generate(problems, prompt_ids, cfg.sampling.with_(seed=seed))
        stats.update(gen_stats)
        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        rewards = self.score(texts, [p for p in problems for _ in range(G)])
        t2 = time.perf_counter()
        advantages = group_advantages(rewards, G, cfg.scale_std_advantages)
        ids, mask, P, rmask = build_sequences([x for x in prompt_ids for _ in range(G)], gen.completion_ids,
                                              self.tokenizer.pad_token_id)
        batch = RolloutBatch(input_ids=ids, attention_mask=mask, prompt_len=P, response_mask=rmask, rewards=rewards,
                             advantages=advantages, group_ids=torch.arange(len(problems)).repeat_interleave(G))
        if self.policy.plan.teacher_prompt == "privileged":
            (batch.teacher_input_ids, batch.teacher_attention_mask,
             batch.teacher_prompt_len) = self._privileged_layout(problems, gen.completion_ids)
        if gen.logprobs is not None and self.responses == "student":
            batch.sampler_logprobs = pad_rows_float(gen.logprobs, rmask.shape[1])
        if self.policy.needs_prompt_texts:
            batch.prompt_texts = [p.prompt for p in problems for _ in range(G)]
        if self.policy.teacher_names:
            batch.teacher_ids = self._teacher_ids(problems).repeat_interleave(G)
            for k, name in enumerate(self.policy.teacher_names):
                rows = batch.teacher_ids == k
                if rows.any():
                    stats[f"rollout/teacher/{name}/reward_mean"] = rewards[rows].mean().item()
        lengths = rmask.sum(-1)
        stats.update({
            "rollout/reward_mean": rewards.mean().item(), "rollout/reward_std": rewards.std(unbiased=False).item(),
            "rollout/accuracy": (rewards >= cfg.correct_threshold).float().mean().item(),
            "rollout/zero_variance_groups": zero_variance_fraction(rewards, G),
            "rollout/response_length_mean": lengths.mean().item(), "rollout/response_length_max": lengths.max().item(),
            "rollout/truncated_fraction": 1.0 - sum(gen.finished) / len(gen.finished),
            "rollout/prompt_truncated": float(cut),
            "timing/generate": t1 - t0, "timing/score": t2 - t1,
            "rollout/generated_tokens_per_s": lengths.sum().item() / max(t1 - t0, 1e-9),
        })
        every = max(1, len(texts) // max(cfg.log_samples, 1))
        samples = [(self.prompt_text(prompt_ids[i // G]), texts[i], rewards[i].item())
                   for i in range(0, len(texts), every)][:cfg.log_samples]
        self.stats, self.samples = stats, samples
        return Rollout(batch, stats, samples)

    # ------------------------------------------------------------------------------------------------ 6-7. steps
    def annotate(self, rollout: Rollout) -> None:
        """Old / reference / teacher log-probs of the batch, before any update on it (``timing/annotate``)."""
        t0 = time.perf_counter()
        rollout.stats.update(self.policy.annotator.annotate(rollout.batch,
                                                            need_old=self.settings.updates_per_rollout > 1))
        rollout.stats["timing/annotate"] = time.perf_counter() - t0

    def make_steps(self, rollout: Rollout, seed: int) -> list[StepBatch]:
        cfg = self.settings
        steps = make_steps(rollout.batch, steps_per_rollout=cfg.steps_per_rollout, ppo_epochs=cfg.ppo_epochs,
                           micro_batch_size=cfg.micro_batch_size, group_by_length=cfg.group_by_length, seed=seed)
        for s in steps:
            s.max_response_len = cfg.sampling.max_new_tokens
        steps[0].stats, steps[0].samples = rollout.stats, rollout.samples
        return steps

    def steps(self, epoch: int, rank: int = 0, world: int = 1, step: int = 0) -> list[StepBatch]:
        """The optimizer steps of rank ``rank``'s rollout batch ``epoch``, the student at optimizer step ``step``."""
        cfg = self.settings
        seed = cfg.rollout_seed(epoch, rank)
        if self.asynchronous is not None:  # sampled ahead, from the weights of up to k steps ago
            rollout = self.asynchronous.rollout(epoch, step)
            self.stats, self.samples = rollout.stats, rollout.samples
            self.annotate(rollout)  # the trainer's own pre-update policy, reference and teacher, now
            steps = self.make_steps(rollout, seed)
            for j, s in enumerate(steps):
                s.stats = {**(s.stats or {}), **self.asynchronous.staleness(rollout, step, j)}
            return steps
        offset = cfg.problem_offset(epoch, rank, world)
        rollout = self.rollout(self.problems(offset), seed, step, first_index=offset)
        self.prefetch(cfg.problem_offset(epoch + 1, rank, world))
        self.annotate(rollout)
        return self.make_steps(rollout, seed)

    def after_step(self, epoch: int, batch_idx: int, step: int) -> None:
        """The trainer finished step ``batch_idx`` of rollout batch ``epoch`` (the student now at version ``step``):
        asynchronous rollouts due from these weights start now."""
        if self.asynchronous is not None:
            self.asynchronous.after_slot(epoch, batch_idx, step)

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, problems: list[Problem], step: int, params: Optional[SamplingParams] = None) -> EvalResult:
        """``val_k`` samples per problem from the student at optimizer step ``step``, scored by the verifier."""
        params = params or self.settings.val_sampling
        if self.asynchronous is not None:
            self.asynchronous.drain()  # the sampler is free again before it takes the current weights
        self.sync(step)
        prompt_ids, _ = self.encode_prompts(problems)
        gen = self.sampler.generate(prompt_ids, params.with_(seed=self.settings.seed + 17))
        k = params.n
        texts = self.tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
        scores = score_completions(self.task.verify, f"{self.task.field}.verify", texts,
                                   [p for p in problems for _ in range(k)]).view(-1, k)
        lengths = torch.tensor([len(c) for c in gen.completion_ids], dtype=torch.float32)
        truncated = torch.tensor([not f for f in gen.finished])
        return EvalResult(scores, lengths.view(-1, k), truncated.view(-1, k), [p.difficulty for p in problems],
                          correct=scores >= self.settings.correct_threshold)

    def close(self) -> None:
        """Release engines that hold resources (a vLLM engine) and the prefetch thread; a later call restarts."""
        for sampler in (self.sampler, self.teacher_sampler):
            close = getattr(sampler, "close", None)
            if callable(close):
                close()
        if self.asynchronous is not None:
            self.asynchronous.close()
        self._sampler_ready = self._teacher_ready = False
        self._synced_at_step = -1
        self._next_problems = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None


__all__ = ["RolloutPipeline", "Policy", "Rollout"]
