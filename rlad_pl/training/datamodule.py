"""``RolloutDataModule``: on-policy rollouts, refreshed every epoch.

One epoch = one rollout batch: take ``prompts_per_rollout`` prompts (per rank) from the task, sync the student's
weights into the sampler, sample ``group_size`` responses per prompt, score them with the verifier, compute group
advantages, let the module annotate the batch (old / reference / teacher log-probs, before any update), then serve
``steps_per_rollout * ppo_epochs`` optimizer steps of ``micro_batch_size``-sequence micro-batches. A group never
spans ranks, so advantages are exact. The trainer must reload dataloaders every epoch (the CLI sets it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlad_pl.core.advantages import group_advantages, zero_variance_fraction
from rlad_pl.core.batch import RolloutBatch, StepBatch, build_sequences, pad_rows
from rlad_pl.data.prompts import PromptFormat, encode_prompt
from rlad_pl.data.tasks import Problem, Task
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_float, check_int
from rlad_pl.objectives.base import DATASET_PREFIXES, PRIVILEGED_PROMPT, TEACHER_PREFIXES
from rlad_pl.rollout.cache import GenerationCache
from rlad_pl.rollout.hf import HFSampler
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams

Reward = Callable[[str, Problem], float]


def _identity(x):
    return x


@dataclass
class EvalResult:
    scores: torch.Tensor  # [P, k] verifier scores
    lengths: torch.Tensor  # [P, k] response lengths in tokens
    truncated: torch.Tensor  # [P, k] bool
    difficulties: list[Optional[str]]


class RolloutDataModule(L.LightningDataModule):
    """On-policy rollout data.

    Args:
        task: where prompts and verifiers come from (``class_path`` of a ``Task``).
        sampler: rollout engine; default: Hugging Face ``generate`` on the student (``HFSampler``).
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
        teacher_sampler: engine for teacher-prefix objectives (default: Hugging Face ``generate`` on the teacher).
        teacher_cache_dir: cache teacher-sampled responses on disk and reuse them across epochs and runs.
        seed_per_prompt: sample each prompt's group in its own engine call, seeded by the prompt's global index
            (``seed + index``), so training rollouts do not depend on the number of ranks or on
            ``prompts_per_rollout`` (layout-equivalence tests, reproducible reruns on other hardware layouts).
            Slower: one ``generate`` per prompt. Default off: one call per rank, seeded by epoch and rank.
        group_by_length: order the sequences of each optimizer step by length before cutting micro-batches (the
            step's loss and gradient are unchanged; micro-batches of similar length pad less). Micro-batches are
            always trimmed to their own longest prompt and response.
        prompt_format: how prompt text becomes token ids (chat template, system prompt, template kwargs, raw);
            the same settings encode the teacher's privileged prompt (``rlad_pl.data.prompts.PromptFormat``).
    """

    def __init__(self, task: Task, sampler: Optional[Sampler] = None, reward: Optional[Reward] = None,
                 prompts_per_rollout: int = 8, group_size: int = 8, micro_batch_size: int = 16,
                 steps_per_rollout: int = 1, ppo_epochs: int = 1, sampling: Optional[SamplingParams] = None,
                 scale_std_advantages: bool = True, max_prompt_length: int = 1024, val_prompts: int = 64,
                 val_k: int = 4, val_sampling: Optional[SamplingParams] = None, pass_k: Optional[list[int]] = None,
                 correct_threshold: float = 1.0, val_batch_prompts: int = 64, log_samples: int = 4, seed: int = 0,
                 teacher_sampler: Optional[Sampler] = None, teacher_cache_dir: Optional[str] = None,
                 seed_per_prompt: bool = False,
                 group_by_length: bool = False, prompt_format: Optional[PromptFormat] = None):
        super().__init__()
        for name, value in (("prompts_per_rollout", prompts_per_rollout), ("group_size", group_size),
                            ("micro_batch_size", micro_batch_size), ("steps_per_rollout", steps_per_rollout),
                            ("ppo_epochs", ppo_epochs), ("val_k", val_k)):
            if value < 1:
                raise ConfigError(f"data.{name}", f"expected a positive integer, got {value}")
        check_int("data.max_prompt_length", max_prompt_length)
        check_int("data.val_prompts", val_prompts, hint=" (to skip validation set trainer.limit_val_batches: 0)")
        check_int("data.val_batch_prompts", val_batch_prompts)
        check_int("data.log_samples", log_samples, minimum=0)
        check_int("data.seed", seed, minimum=0)
        check_float("data.correct_threshold", correct_threshold)
        for k in pass_k or []:
            check_int("data.pass_k", k, hint=f" in {pass_k}")
        limit = getattr(sampler, "max_model_len", None)
        sampling_params = [(n, p) for n, p in (("sampling", sampling), ("val_sampling", val_sampling)) if p]
        for name, params in sampling_params:
            if isinstance(limit, int) and params.max_new_tokens >= limit:
                raise ConfigError(f"data.{name}.max_new_tokens", f"{params.max_new_tokens} leaves no room for a "
                                  f"prompt within data.sampler.init_args.max_model_len={limit}")
        if reward is not None and not callable(reward):
            raise ConfigError("data.reward", f"expected a callable (completion, problem) -> float, got {reward!r}")
        if (prompts_per_rollout * group_size) % steps_per_rollout:
            raise ConfigError("data.steps_per_rollout", f"{prompts_per_rollout * group_size} sequences per rollout "
                              f"do not split into {steps_per_rollout} equal optimizer steps")
        self.task, self.reward = task, reward
        self.sampler = sampler if sampler is not None else HFSampler()
        self.prompts_per_rollout, self.group_size = prompts_per_rollout, group_size
        self.micro_batch_size, self.steps_per_rollout, self.ppo_epochs = micro_batch_size, steps_per_rollout, ppo_epochs
        self.group_by_length = group_by_length
        self.prompt_format = prompt_format or PromptFormat()
        self._shown_prompt = False
        self.sampling = (sampling or SamplingParams()).with_(n=group_size)
        self.val_sampling = (val_sampling or self.sampling).with_(n=val_k)
        self.scale_std_advantages, self.max_prompt_length = scale_std_advantages, max_prompt_length
        self.val_prompts, self.val_k, self.val_batch_prompts = val_prompts, val_k, val_batch_prompts
        self.pass_k = sorted(set(pass_k or [1, val_k]))
        if self.pass_k[-1] > val_k:
            raise ConfigError("data.pass_k", f"every k must be <= val_k={val_k}, got {self.pass_k}")
        self.correct_threshold, self.log_samples, self.seed = correct_threshold, log_samples, seed
        self.teacher_sampler, self.teacher_cache_dir = teacher_sampler, teacher_cache_dir
        self.seed_per_prompt = seed_per_prompt
        self._teacher_ready = False
        self._teacher_cache: Optional[GenerationCache] = None
        self.rollout_stats: dict[str, float] = {}
        self.samples: list[tuple[str, str, float]] = []
        self._sampler_ready = False
        self._synced_at_step = -1
        self._next_problems = None  # (offset, count, Future): the next rollout's problems, prepared in a thread
        self._prefetcher = None

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def module(self):
        return self.trainer.lightning_module

    @property
    def tokenizer(self):
        return self.module.tokenizer

    @property
    def updates_per_rollout(self) -> int:
        return self.steps_per_rollout * self.ppo_epochs

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.prompt_format)

    def setup(self, stage: str) -> None:
        """Check ``prompt_format`` against the tokenizer before any compute: a chat setting with no template to
        apply, or a template that fails to render, is a one-line error here rather than at the first rollout."""
        self.encode_prompt("1+1=")

    def prompt_text(self, ids: list[int]) -> str:
        """A prompt as the model sees it (template and special tokens included), for logs."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _prepare_sampler(self) -> dict[str, float]:
        """Sync the current student into the engine once per optimizer step."""
        if not self._sampler_ready:
            self.sampler.setup(self.module.student, self.tokenizer)
            self._sampler_ready = True
        step = self.trainer.global_step
        if self._synced_at_step == step:
            return {}
        t0 = time.perf_counter()
        stats = self.sampler.sync_weights(self.module.student)
        self._synced_at_step = step
        return {"timing/weight_sync": time.perf_counter() - t0, **{f"sync/{k}": v for k, v in stats.items()}}

    @property
    def prefix_source(self) -> str:
        """Where responses come from: ``teacher`` (teacher-prefix objectives), ``dataset`` (the task's reference
        solutions, e.g. SFT) or ``student`` (on-policy, the default)."""
        req = self.module.requires
        if TEACHER_PREFIXES in req and DATASET_PREFIXES in req:
            raise ConfigError("model.objectives", "objectives ask for both teacher and dataset prefixes; combine "
                              "objectives that share one prefix source")
        return "teacher" if TEACHER_PREFIXES in req else "dataset" if DATASET_PREFIXES in req else "student"

    def _dataset_responses(self, problems: list[Problem], n: int) -> Generation:
        """The reference solutions as responses (``n`` copies per problem), ``eos`` appended, cut at max length."""
        tok, limit = self.tokenizer, self.sampling.max_new_tokens
        rows, finished = [], []
        for p in problems:
            if p.solution is None:
                raise ConfigError(f"{self.task.field}.solution_template", "a dataset-prefix objective trains on "
                                  f"reference solutions, but problem '{p.prompt[:40]}' has none")
            ids = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows += [ids[:limit]] * n
            finished += [len(ids) <= limit] * n
        return Generation(rows, finished)

    def _generate(self, problems: list[Problem], prompt_ids: list[list[int]], params: SamplingParams
                  ) -> tuple[Generation, dict[str, float]]:
        """Responses from the prefix source: the student's engine (synced) or the frozen teacher."""
        if self.prefix_source == "student":
            return self.sampler.generate(prompt_ids, params), {}
        if self.prefix_source == "dataset":
            return self._dataset_responses(problems, params.n), {}
        if self.module.teacher is None:
            raise ConfigError("model.teacher", "teacher-prefix objectives sample from the teacher; set model.teacher")
        if not self._teacher_ready:
            self.teacher_sampler = self.teacher_sampler or HFSampler()
            self.teacher_sampler.setup(self.module.teacher, self.tokenizer)
            self.teacher_sampler.sync_weights(self.module.teacher)  # frozen: one sync is enough
            if self.teacher_cache_dir:
                self._teacher_cache = GenerationCache(self.teacher_cache_dir, tag=self.module.model_tags["teacher"])
            self._teacher_ready = True
        if self._teacher_cache is None:
            return self.teacher_sampler.generate(prompt_ids, params), {}
        gen = self._teacher_cache.get_or_generate(prompt_ids, params, self.teacher_sampler.generate)
        return gen, {"rollout/teacher_cache_hits": float(self._teacher_cache.hits)}

    def _privileged_layout(self, problems: list[Problem], responses: list[list[int]]):
        """``[left-padded privileged prompt | same response tokens]`` for the teacher (OPSD)."""
        missing = [p.prompt[:40] for p in problems if p.privileged is None]
        if missing:
            raise ConfigError(f"{self.task.field}.privileged_template", "the objective scores responses under a "
                              f"privileged prompt, but problem '{missing[0]}' has none (set the task's privileged "
                              "template / field)")
        priv_ids = [self.encode_prompt(p.privileged)[-self.max_prompt_length:] for p in problems]
        ids, mask, P, _ = build_sequences([x for x in priv_ids for _ in range(self.group_size)], responses,
                                          self.tokenizer.pad_token_id)
        return ids, mask, P

    def _score(self, completions: list[str], problems: list[Problem], reward: Optional[Reward]) -> torch.Tensor:
        """One finite float per completion. A reward function that raises or returns None / NaN / a non-number
        stops the run with one line naming the sample index, its prompt and the value."""
        fn = reward if reward is not None else self.task.verify
        field = "data.reward" if reward is not None else f"{self.task.field}.verify"
        scores = []
        for i, (c, p) in enumerate(zip(completions, problems)):
            where = f"sample {i} (prompt {p.prompt[:60]!r}, completion {c[:40]!r})"
            try:
                value = fn(c, p)
            except Exception as e:  # noqa: BLE001  (any failure of user code: name the sample)
                raise ConfigError(field, f"{type(fn).__name__} raised {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]} on {where}") from e
            try:
                score = float(value)
            except (TypeError, ValueError):
                score = None
            if score is None or not math.isfinite(score):
                raise ConfigError(field, f"expected a finite float, got {value!r} on {where}")
            scores.append(score)
        return torch.tensor(scores, dtype=torch.float32)

    def _decode(self, ids: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _encode_all(self, problems: list[Problem]) -> tuple[list[list[int]], int]:
        ids = [self.encode_prompt(p.prompt) for p in problems]
        if ids and not self._shown_prompt:  # a template's default system prompt shows here
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"rlad_pl: first prompt as encoded for the model: {self.prompt_text(ids[0])!r}")
            self._shown_prompt = True
        cut = sum(len(x) > self.max_prompt_length for x in ids)
        return [x[-self.max_prompt_length:] for x in ids], cut

    # ----------------------------------------------------------------------------------------- training
    def _generate_per_prompt(self, problems: list[Problem], prompt_ids: list[list[int]], first_index: int
                             ) -> tuple[Generation, dict[str, float]]:
        """``seed_per_prompt``: one engine call per prompt, seeded by the prompt's global index."""
        rows, finished, logprobs, stats = [], [], [], {}
        for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
            gen, stats = self._generate([problem], [ids], self.sampling.with_(seed=self.seed + first_index + i))
            rows += gen.completion_ids
            finished += gen.finished
            logprobs = None if gen.logprobs is None or logprobs is None else logprobs + gen.logprobs
        return Generation(rows, finished, logprobs), stats

    def make_rollout(self, problems: list[Problem], seed: int, first_index: int = 0) -> RolloutBatch:
        """Sample, score and lay out one rollout batch; fills ``rollout_stats`` and ``samples``. ``first_index``:
        global index of ``problems[0]`` (used by ``seed_per_prompt``)."""
        G = self.group_size
        stats = self._prepare_sampler() if self.prefix_source == "student" else {}
        prompt_ids, cut = self._encode_all(problems)
        t0 = time.perf_counter()
        if self.seed_per_prompt:
            gen, gen_stats = self._generate_per_prompt(problems, prompt_ids, first_index)
        else:
            gen, gen_stats = self._generate(problems, prompt_ids, self.sampling.with_(seed=seed))
        stats.update(gen_stats)
        t1 = time.perf_counter()
        texts = self._decode(gen.completion_ids)
        rep_problems = [p for p in problems for _ in range(G)]
        rewards = self._score(texts, rep_problems, self.reward)
        t2 = time.perf_counter()
        if not torch.isfinite(rewards).all():
            raise ValueError("reward: the reward function returned a non-finite value")
        advantages = group_advantages(rewards, G, self.scale_std_advantages)
        ids, mask, P, rmask = build_sequences([x for x in prompt_ids for _ in range(G)], gen.completion_ids,
                                              self.tokenizer.pad_token_id)
        rollout = RolloutBatch(input_ids=ids, attention_mask=mask, prompt_len=P, response_mask=rmask,
                               rewards=rewards, advantages=advantages,
                               group_ids=torch.arange(len(problems)).repeat_interleave(G))
        if PRIVILEGED_PROMPT in self.module.requires:
            (rollout.teacher_input_ids, rollout.teacher_attention_mask,
             rollout.teacher_prompt_len) = self._privileged_layout(problems, gen.completion_ids)
        if gen.logprobs is not None and self.prefix_source == "student":
            rollout.sampler_logprobs = pad_rows_float(gen.logprobs, rmask.shape[1])
        lengths = rmask.sum(-1)
        correct = (rewards >= self.correct_threshold).float()
        stats.update({
            "rollout/reward_mean": rewards.mean().item(), "rollout/reward_std": rewards.std(unbiased=False).item(),
            "rollout/accuracy": correct.mean().item(),
            "rollout/zero_variance_groups": zero_variance_fraction(rewards, G),
            "rollout/response_length_mean": lengths.mean().item(), "rollout/response_length_max": lengths.max().item(),
            "rollout/truncated_fraction": 1.0 - sum(gen.finished) / len(gen.finished),
            "rollout/prompt_truncated": float(cut),
            "timing/generate": t1 - t0, "timing/score": t2 - t1,
            "rollout/generated_tokens_per_s": lengths.sum().item() / max(t1 - t0, 1e-9),
        })
        self.rollout_stats = stats
        self.samples = [(self.prompt_text(prompt_ids[i // G]), texts[i], rewards[i].item())
                        for i in range(0, len(texts), max(1, len(texts) // max(self.log_samples, 1)))
                        ][:self.log_samples]
        return rollout

    def make_steps(self, rollout: RolloutBatch, seed: int) -> list[StepBatch]:
        """Split a rollout batch into optimizer steps of micro-batches, reshuffled per PPO epoch."""
        n = rollout.num_sequences
        per_step = n // self.steps_per_rollout
        gen = torch.Generator().manual_seed(seed)
        lengths = rollout.attention_mask.sum(-1)
        steps = []
        for epoch in range(self.ppo_epochs):
            order = torch.randperm(n, generator=gen) if self.updates_per_rollout > 1 else torch.arange(n)
            for s in range(self.steps_per_rollout):
                idx = order[s * per_step:(s + 1) * per_step]
                if self.group_by_length:  # same step, same loss; micro-batches of similar length pad less
                    idx = idx[torch.argsort(lengths[idx], stable=True)]
                steps.append(StepBatch([rollout.select(idx[j:j + self.micro_batch_size]).trim_padding()
                                        for j in range(0, per_step, self.micro_batch_size)]))
        return steps

    def train_dataloader(self) -> DataLoader:
        """The optimizer steps of this epoch's rollout batch, built on first access (``LazySteps``): Lightning also
        asks for a loader before restoring a checkpoint's epoch counter and then replaces it unused, so nothing is
        sampled or scored for it."""
        return DataLoader(LazySteps(self.build_steps, self.updates_per_rollout), batch_size=None, shuffle=False,
                          collate_fn=_identity)

    def build_steps(self) -> list[StepBatch]:
        """Sample, score and annotate the rollout batch of the trainer's current epoch; split it into steps."""
        trainer = self.trainer
        rank, world, epoch = trainer.global_rank, trainer.world_size, trainer.current_epoch
        offset = (epoch * world + rank) * self.prompts_per_rollout
        problems = self._train_problems(offset)
        seed = self.seed + 1_000_003 * epoch + 7919 * rank
        rollout = self.make_rollout(problems, seed, first_index=offset)
        self._prefetch_problems(((epoch + 1) * world + rank) * self.prompts_per_rollout)
        t0 = time.perf_counter()
        self.rollout_stats.update(self.module.annotate_rollouts(rollout, need_old=self.updates_per_rollout > 1))
        self.rollout_stats["timing/annotate"] = time.perf_counter() - t0
        return self.make_steps(rollout, seed)

    def _train_problems(self, offset: int) -> list[Problem]:
        """The ``prompts_per_rollout`` training problems from ``offset``: the prefetched list when it is the one
        asked for (the same call, made earlier in a thread), else computed now."""
        pending, self._next_problems = self._next_problems, None
        if pending is not None and pending[:2] == (offset, self.prompts_per_rollout):
            return pending[2].result()  # an exception of the task's problems() surfaces here, as if called now
        return self.task.problems("train", self.prompts_per_rollout, offset=offset)

    def _prefetch_problems(self, offset: int) -> None:
        """Start computing the next rollout's problems in a background thread, overlapping the update (for tasks
        that declare ``prefetch_safe``: pure ``problems``). Problem generation is Python (reasoning-gym items,
        templates) and otherwise runs between updates, on the critical path."""
        if not getattr(self.task, "prefetch_safe", False):
            return
        if self._prefetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlad_pl-problems")
        future = self._prefetcher.submit(self.task.problems, "train", self.prompts_per_rollout, offset=offset)
        self._next_problems = (offset, self.prompts_per_rollout, future)

    def state_dict(self) -> dict:
        """Saved in checkpoints. The position in the task is the trainer's epoch; this adds the random generators
        (rollout seeds are derived from ``seed`` and the epoch, but other code may draw from the global ones)."""
        return {"seed": self.seed, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            set_rng_state(state["rng"])

    def teardown(self, stage: str) -> None:
        """Release engines that hold resources (a vLLM engine) at the end of a stage."""
        for sampler in (self.sampler, self.teacher_sampler):
            close = getattr(sampler, "close", None)
            if callable(close):
                close()
        self._sampler_ready = self._teacher_ready = False
        self._synced_at_step = -1
        self._next_problems = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None

    # ----------------------------------------------------------------------------------------- evaluation
    def eval_problems(self, split: str) -> list[Problem]:
        return self.task.problems(split, self.val_prompts, offset=0)

    def buckets(self, split: str = "val") -> list[str]:
        return sorted({p.difficulty for p in self.eval_problems(split) if p.difficulty is not None})

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.eval_problems(split)[rank::world]
        chunks = [mine[i:i + self.val_batch_prompts] for i in range(0, len(mine), self.val_batch_prompts)]
        return DataLoader(chunks, batch_size=None, shuffle=False, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def evaluate(self, problems: list[Problem], params: Optional[SamplingParams] = None) -> EvalResult:
        """Sample ``val_k`` responses per problem with the current student and score them with the verifier."""
        params = params or self.val_sampling
        self._prepare_sampler()
        prompt_ids, _ = self._encode_all(problems)
        gen = self.sampler.generate(prompt_ids, params.with_(seed=self.seed + 17))
        k = params.n
        texts = self._decode(gen.completion_ids)
        scores = self._score(texts, [p for p in problems for _ in range(k)], None)
        lengths = torch.tensor([len(c) for c in gen.completion_ids], dtype=torch.float32)
        truncated = torch.tensor([not f for f in gen.finished])
        return EvalResult(scores.view(-1, k), lengths.view(-1, k), truncated.view(-1, k),
                          [p.difficulty for p in problems])


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


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when initialised) random generator states."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    # plain Python / torch values only: Lightning loads checkpoints with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def pad_rows_float(rows: list[list[float]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


__all__ = ["RolloutDataModule", "EvalResult", "pad_rows", "encode_prompt"]
