"""``VLLMTeacher``: the teacher on an in-process vLLM engine that scores the rollouts by prefill
(``prompt_logprobs``): sampled-token log-probs and top-k distributions (``prompt_logprobs=k``; full-vocabulary
objectives without ``teacher_top_k`` are refused at construction, one line). vLLM computes prompt log-probs as
``log_softmax(logits)`` at temperature 1 over the model's whole (possibly padded) vocabulary; a worker-side hook
replaces that by ``log_softmax(logits[:V] / T)``, the trainer's quantity, so a module temperature other than 1 is
applied exactly, before vLLM takes the top-k. If the hook cannot be installed, T != 1 (or a padded vocabulary) is
refused.

The engine is started and stopped by the lifecycle it shares with ``VLLMSampler`` (``rlad_pl.rollout.engine``: the
CPU chunked-prefill workaround, ``external_launcher`` with several ranks, the thread-count restore, the shutdown that
leaves a trainer's process group alone).
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Any, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import TEACHER_LOGPROBS, TEACHER_TOPK
from rlad_pl.rollout.engine import (
    EngineHandle,
    complete_engine_kwargs,
    import_vllm,
    missing_vllm,
    shutdown_engine,
    start_engine,
)
from rlad_pl.teacher.base import FIELD, TeacherScorer, teacher_layout
from rlad_pl.teacher.entries import _position_entries, _sampled_values, _token_rows, _topk_values


def _worker_set_prompt_scoring(worker, temperature: float, vocab_size: int) -> bool:
    """Prompt log-probs as ``log_softmax(logits[:, :vocab_size] / temperature)`` (vLLM: ``log_softmax(logits)``).

    This engine only scores prompts (its one generated token is greedy and asks for no log-probs), so replacing the
    sampler's ``compute_logprobs``, which vLLM calls for prompt log-probs, changes nothing else."""
    sampler = getattr(worker.model_runner, "sampler", None)
    if sampler is None or not callable(getattr(sampler, "compute_logprobs", None)):
        return False

    def compute_logprobs(logits: Tensor) -> Tensor:
        z = logits[..., :vocab_size].float()
        return (z / temperature if temperature != 1.0 else z).log_softmax(dim=-1)

    sampler.compute_logprobs = compute_logprobs
    return True


class VLLMTeacher(TeacherScorer):
    """The teacher on an in-process vLLM engine, scoring rollouts by prefill (sampled-token log-probs).

    The engine starts at the first scoring (about 30 s for the tiny models on 2 CPU cores) from the teacher's files;
    it never changes (the teacher is frozen), so there is no weight sync.

    Args:
        dtype: engine dtype; default: ``model.teacher_dtype`` (else ``model.dtype``).
        max_model_len: longest teacher sequence + 1 (default: the model's max positions).
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache (on CPU prefer
            ``engine_kwargs: {kv_cache_memory_bytes: ...}``).
        tensor_parallel_size: GPUs for the engine (1 when training runs on several ranks).
        enforce_eager: skip CUDA-graph / torch.compile capture.
        engine_kwargs: extra ``vllm.LLM`` keyword arguments (e.g. ``kv_cache_memory_bytes``, ``max_num_seqs``).
    """

    provides = frozenset({TEACHER_LOGPROBS, TEACHER_TOPK})
    in_trainer = False

    def __init__(self, dtype: Optional[str] = None, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, enforce_eager: bool = True,
                 engine_kwargs: Optional[dict[str, Any]] = None):

        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or max_model_len < 2):
            raise ConfigError(f"{FIELD}.init_args.max_model_len", f"expected an integer >= 2 or null, got "
                              f"{max_model_len!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"{FIELD}.init_args.gpu_memory_utilization", "expected a fraction in (0, 1], got "
                              f"{gpu_memory_utilization}")
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise ConfigError(f"{FIELD}.init_args.tensor_parallel_size", f"expected an integer >= 1, got "
                              f"{tensor_parallel_size!r}")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(FIELD, missing_vllm("VLLMTeacher"))
        self.dtype, self.max_model_len = dtype, max_model_len
        self.gpu_memory_utilization, self.tensor_parallel_size = gpu_memory_utilization, tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine: Optional[EngineHandle] = None
        self.source = None
        self.start_seconds = 0.0
        self._hooked = False
        self._scoring: Optional[tuple[float, int]] = None  # (temperature, vocab) the worker hook computes

    @property
    def llm(self):
        """The running ``vllm.LLM`` (None before the first scoring and after ``close``)."""
        return self._engine.llm if self._engine is not None else None

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        self.source, self.dtype = source, self.dtype or dtype
        return None

    # ------------------------------------------------------------------------------------------------- engine
    def _start(self) -> None:
        import_vllm(FIELD, "VLLMTeacher")
        folder = str(self.source.folder)
        kwargs: dict[str, Any] = dict(
            model=folder, tokenizer=folder, dtype=self.dtype, seed=0, tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager, gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=False, generation_config="vllm",
            trust_remote_code=self.source.trust_remote_code)
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.top_k is not None:  # vLLM refuses prompt_logprobs above max_logprobs (default 20)
            kwargs["max_logprobs"] = max(20, self.top_k)
        # CPU: every prompt in one prefill step (vLLM-CPU's chunked prefill has bugs, see rollout/engine.py)
        kwargs = complete_engine_kwargs(kwargs, self.engine_kwargs, max_len=self.max_model_len)
        try:
            self._engine = start_engine(kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise ConfigError(FIELD, f"the vLLM teacher engine did not start on '{self.source.spec}': "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.start_seconds = self._engine.start_seconds
        self._scoring = None


    def _engine_vocab(self) -> int:
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    def _configure(self, temperature: float, vocab_size: int) -> None:
        """Point the worker hook at this (temperature, vocabulary); refuse what cannot be computed exactly."""
        if self._scoring == (temperature, vocab_size):
            return
        results = self.llm.collective_rpc(_worker_set_prompt_scoring, args=(float(temperature), int(vocab_size)))
        self._hooked = bool(results) and all(results)
        if not self._hooked:
            if temperature != 1.0:
                raise ConfigError("model.temperature", f"VLLMTeacher scores at temperature 1 (vLLM's prompt "
                                  f"log-probs) and could not hook this vLLM version to apply {temperature:g}; set "
                                  "model.temperature: 1.0 or use rlad_pl.teacher.LocalTeacher")
            if self._engine_vocab() != vocab_size:
                raise ConfigError(FIELD, f"the teacher's output layer has {self._engine_vocab()} rows, the shared "
                                  f"tokenizer {vocab_size}; vLLM would normalise over the padding rows and this "
                                  "vLLM version could not be hooked; use rlad_pl.teacher.LocalTeacher")
        self._scoring = (temperature, vocab_size)

    # ------------------------------------------------------------------------------------------------- scoring
    def _prompt_logprobs(self, batch: RolloutBatch, temperature: float, vocab_size: int, n: int):
        """Prefill the teacher layout with ``prompt_logprobs=n``: per sequence and response position, the engine's
        ``{token id: Logprob}`` entry and the token there (``(None, None)`` at padding)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self._start()
        self._configure(temperature, vocab_size)
        ids, mask, P = teacher_layout(batch)
        rows, keep, compact = _token_rows(ids, mask)
        limit = self.llm.llm_engine.model_config.max_model_len
        longest = max((len(r) for r in rows), default=0)
        if longest + 1 > limit:
            raise ConfigError(f"{FIELD}.init_args.max_model_len", f"a teacher sequence has {longest} tokens, the "
                              f"vLLM teacher engine's max_model_len is {limit}; raise it to at least {longest + 1}")
        cap = int(getattr(self.llm.llm_engine.model_config, "max_logprobs", -1))
        if n > 0 and cap != -1 and n > cap:
            raise ConfigError(f"{FIELD}.init_args.engine_kwargs", f"the vLLM teacher engine returns at most "
                              f"max_logprobs={cap} log-probs per position, teacher_top_k asks for {n}; remove "
                              "max_logprobs from engine_kwargs or raise it")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=n, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        return _position_entries([o.prompt_logprobs or [] for o in outputs], rows, keep, compact, P,
                                 ids.shape[1] - P)

    @torch.no_grad()
    def token_logprobs(self, batch, *, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, 0)
        return _sampled_values(entries, lambda e, tok: e[tok].logprob).to(batch.input_ids.device)

    @torch.no_grad()
    def topk(self, batch, *, k, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, k)
        return _topk_values(entries, k, lambda e: {int(t): float(lp.logprob) for t, lp in e.items()}).to(
            batch.input_ids.device)

    def close(self) -> None:
        if self._engine is not None:
            shutdown_engine(self._engine, "VLLMTeacher")
            self._engine = None
            self._scoring = None
            gc.collect()


__all__ = ["VLLMTeacher"]
