"""Teacher scoring: one interface (``TeacherScorer``), backends chosen in YAML under ``model.teacher_backend``.

The module asks its backend for what the objectives declare in ``requires``; the objectives never see which backend
ran. Three inputs exist:

* ``teacher_logprobs``: ``log pi_T(y_t | prefix)`` at the sampled tokens, ``[N, R]`` (TRRD, KDRL, OPD, ReNIO);
* ``teacher_hidden``: the teacher's final hidden states ``[N, R, H_T]`` plus its LM head, from which the
  full-vocabulary objectives (forward / reverse KL, KL-mix, JSD, skew KL, OPSD) build distributions chunk by chunk;
* ``teacher_topk``: the teacher's top-k ids and log-probs per position plus its remaining mass
  (``rlad_pl.core.topk.TeacherTopK``), for the same objectives with ``teacher_top_k: k``; every backend provides it.

Backends:

* ``LocalTeacher`` (default): the frozen teacher in the trainer, a Hugging Face forward with the chunked LM head
  (``rlad_pl.core.logprobs``), FSDP2-shardable like the student; a LoRA student's adapters-off base when the teacher is
  the initial student. Exact, every input, any temperature.
* ``VLLMTeacher``: an in-process vLLM engine that scores the rollouts by prefill (``prompt_logprobs``): sampled-token
  log-probs and top-k distributions (``prompt_logprobs=k``; full-vocabulary objectives without ``teacher_top_k``
  are refused at construction, one line). vLLM computes prompt
  log-probs as ``log_softmax(logits)`` at temperature 1 over the model's whole (possibly padded) vocabulary; a
  worker-side hook replaces that by ``log_softmax(logits[:V] / T)``, the trainer's quantity, so a module temperature
  other than 1 is applied exactly, before vLLM takes the top-k. If the hook cannot be installed, T != 1 (or a
  padded vocabulary) is refused.
* ``ServerTeacher``: the same from an OpenAI-compatible vLLM server (``prompt_logprobs`` extra parameter), T = 1.

Every backend sees the teacher's layout of a batch (``teacher_input_ids`` for OPSD's privileged prompt, else the
student's) and returns fp32 values; NaN / -inf are floored by the module as before.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.models.distributed import reshard, root_call
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import response_hidden, response_logprobs
from rlad_pl.objectives.base import TEACHER_HIDDEN, TEACHER_LOGPROBS, TEACHER_PREFIXES, TEACHER_TOPK
from rlad_pl.core.topk import TeacherTopK, chunked_topk, topk_from_entries

log = logging.getLogger(__name__)

FIELD = "model.teacher_backend"
#: the inputs a teacher backend can provide
TEACHER_INPUTS = frozenset({TEACHER_LOGPROBS, TEACHER_HIDDEN, TEACHER_TOPK})


def teacher_layout(batch: RolloutBatch) -> tuple[Tensor, Tensor, int]:
    """``(input_ids, attention_mask, prompt_len)`` the teacher scores: the privileged layout when present."""
    if batch.teacher_input_ids is not None:
        return batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_prompt_len
    return batch.input_ids, batch.attention_mask, batch.prompt_len


class TeacherScorer:
    """A backend that scores rollouts with the frozen teacher.

    ``provides`` lists the objective inputs it can compute; ``check`` refuses (one line) a configuration asking for
    more. ``load`` receives the resolved teacher and returns the ``torch`` model to register on the module (moved,
    sharded and kept in eval mode with it), or ``None`` when the teacher lives elsewhere.
    """

    provides: ClassVar[frozenset[str]] = TEACHER_INPUTS
    #: the teacher is a model in the trainer, so it can also sample teacher-prefix responses
    in_trainer: ClassVar[bool] = True

    #: the largest teacher_top_k the objectives ask for (set by ``check``; an engine sizes its top-k limit by it)
    top_k: Optional[int] = None

    def check(self, requires: frozenset[str], objective_names: list[str], top_k: Optional[int] = None,
              responses: str = "student") -> None:
        """Refuse inputs this backend cannot provide (``requires``: the objectives' planned inputs), and teacher
        responses from a teacher outside the trainer, naming the objectives that want them."""
        missing = (requires & TEACHER_INPUTS) - self.provides
        if missing:
            hint = (" (or set the objective's teacher_top_k: a top-k teacher distribution)"
                    if TEACHER_HIDDEN in missing and TEACHER_TOPK in self.provides else "")
            raise ConfigError(FIELD, f"{', '.join(objective_names)} needs {sorted(missing)}, which "
                              f"{type(self).__name__} cannot provide (it gives {sorted(self.provides)}); use "
                              f"rlad_pl.teacher.LocalTeacher{hint}")
        self.top_k = top_k
        if (responses == "teacher" or TEACHER_PREFIXES in requires) and not self.in_trainer:
            raise ConfigError(FIELD, f"{', '.join(objective_names)} samples responses from the teacher, which needs "
                              "the teacher in the trainer; use rlad_pl.teacher.LocalTeacher")

    def load(self, source, dtype: str, *, student_source=None, student_dtype: Optional[str] = None,
             lora=None) -> Optional[torch.nn.Module]:
        raise NotImplementedError

    def token_logprobs(self, batch: RolloutBatch, *, temperature: float, chunk_size: int,
                       vocab_size: int) -> Tensor:
        """``log_softmax(z[:vocab_size] / temperature)`` at the response tokens, fp32 ``[N, R]``."""
        raise NotImplementedError

    def hidden(self, batch: RolloutBatch) -> tuple[Tensor, torch.nn.Module]:
        """Final hidden states predicting the response tokens ``[N, R, H_T]`` (no grad) and the LM head."""
        raise NotImplementedError(f"{type(self).__name__} provides no teacher hidden states")

    def topk(self, batch: RolloutBatch, *, k: int, temperature: float, chunk_size: int,
             vocab_size: int) -> TeacherTopK:
        """Top-``k`` of ``log_softmax(z[:vocab_size] / temperature)`` per response position, plus the tail."""
        raise NotImplementedError(f"{type(self).__name__} provides no teacher top-k")

    def release(self) -> None:
        """After a round of scoring: free what a sharded model gathered (FSDP2)."""

    def close(self) -> None:
        """Free engines / files; a later call starts again."""


class LocalTeacher(TeacherScorer):
    """The frozen teacher as a Hugging Face model in the trainer (today's behaviour, the default)."""

    def __init__(self):
        self.model = None

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        from rlad_pl.models.loading import load_causal_lm

        # a LoRA student's base with adapters off *is* the initial student: no second copy
        if (lora is not None and student_source is not None and source.tag == student_source.tag
                and dtype == student_dtype):
            self.model = lora.base_view()
        else:
            self.model = load_causal_lm(source, "model.teacher", dtype, trainable=False)
        return self.model

    def token_logprobs(self, batch, *, temperature, chunk_size, vocab_size):
        ids, mask, P = teacher_layout(batch)
        logp, _ = root_call(self.model, response_logprobs, self.model, ids, mask, P, temperature=temperature,
                            chunk_size=chunk_size, vocab_size=vocab_size)
        return logp

    @torch.no_grad()
    def hidden(self, batch):
        ids, mask, P = teacher_layout(batch)
        return root_call(self.model, response_hidden, self.model, ids, mask, P), self.model.get_output_embeddings()

    def topk(self, batch, *, k, temperature, chunk_size, vocab_size):
        ids, mask, P = teacher_layout(batch)
        return root_call(self.model, _local_topk, self.model, ids, mask, P, k, temperature, chunk_size, vocab_size)

    def release(self):
        reshard(self.model)


@torch.no_grad()
def _local_topk(model, ids: Tensor, mask: Tensor, P: int, k: int, temperature: float, chunk_size: int,
                vocab_size: int) -> TeacherTopK:
    """Teacher forward, then the top-k from its LM head chunk by chunk (``rlad_pl.core.topk.chunked_topk``)."""
    head = model.get_output_embeddings()
    return chunked_topk(response_hidden(model, ids, mask, P), head.weight, k, bias=getattr(head, "bias", None),
                        temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------------------------

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
        import importlib.util

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
            raise ConfigError(FIELD, "VLLMTeacher needs the vllm package: pip install 'rlad_pl[cpu]' (CPU) or "
                              "'rlad_pl[gpu]' (GPU)")
        self.dtype, self.max_model_len = dtype, max_model_len
        self.gpu_memory_utilization, self.tensor_parallel_size = gpu_memory_utilization, tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.source = None
        self.start_seconds = 0.0
        self._hooked = False
        self._scoring: Optional[tuple[float, int]] = None  # (temperature, vocab) the worker hook computes
        self._owns_dist = False

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        self.source, self.dtype = source, self.dtype or dtype
        return None

    # ------------------------------------------------------------------------------------------------- engine
    def _start(self) -> None:
        from rlad_pl.rollout.vllm import _is_cpu, import_vllm

        vllm = import_vllm()
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
        if _is_cpu() and "enable_chunked_prefill" not in self.engine_kwargs:
            # every prompt in one prefill step (vLLM-CPU's chunked prefill has bugs, see rollout/vllm.py)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(self.max_model_len or 4096), 4096)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(self.engine_kwargs)
        set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        self._owns_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise ConfigError(FIELD, f"the vLLM teacher engine did not start on '{self.source.spec}': "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:  # the CPU worker lowers torch's threads process-wide; training keeps its own
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)
        self.start_seconds = time.perf_counter() - t0
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
        if self.llm is not None:
            _shutdown_engine(self.llm, self._owns_dist)
            self.llm = None
            self._scoring = None
            gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible vLLM server
# ----------------------------------------------------------------------------------------------------------------

class ServerTeacher(TeacherScorer):
    """The teacher behind an OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``), e.g.
    on its own nodes: sampled-token log-probs from ``POST /v1/completions`` with token-id prompts, ``max_tokens: 1``
    and ``prompt_logprobs: 0``; the top-k (``teacher_top_k: k``) with ``prompt_logprobs: k``, which the server must
    allow: start it with ``--max-logprobs`` >= k (vLLM's default is 20; above it the server answers HTTP 400).

    At the first scoring ``GET /v1/models`` must list ``model`` (default: ``model.teacher`` as written, which is the
    id vLLM serves a ``--model`` folder under); otherwise one line names the ids it serves. The server applies no
    temperature to prompt log-probs and normalises over its whole output layer, so a module temperature other than
    1, or a teacher whose output layer is larger than the shared tokenizer, is refused in one line.

    Args:
        url: server base URL, e.g. ``http://teacher-node:8000`` (``/v1`` is appended).
        model: the model id the server must report (default: ``model.teacher``).
        api_key_env: name of the environment variable that holds the API key (sent as a bearer token; the key is
            never logged or saved, only the variable's name is).
        timeout: seconds per request. retries: extra attempts per request after a connection error / 5xx.
        batch_size: sequences per request.
    """

    provides = frozenset({TEACHER_LOGPROBS, TEACHER_TOPK})
    in_trainer = False

    def __init__(self, url: str, model: Optional[str] = None, api_key_env: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 2, batch_size: int = 32):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{FIELD}.init_args.url", f"expected an http(s) URL, got {url!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"{FIELD}.init_args.timeout", f"expected seconds > 0, got {timeout!r}")
        for name, v, low in (("retries", retries, 0), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{FIELD}.init_args.{name}", f"expected an integer >= {low}, got {v!r}")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ConfigError(f"{FIELD}.init_args.api_key_env", f"the environment variable {api_key_env} is not set")
        self.url, self.model, self.api_key_env = url.rstrip("/").removesuffix("/v1"), model, api_key_env
        self.timeout, self.retries, self.batch_size = float(timeout), retries, batch_size
        self.source = None
        self._checked = False
        self._vocab: Optional[int] = None

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        import json

        self.source = source
        self.model = self.model or source.spec
        try:
            self._vocab = int(json.loads((source.folder / "config.json").read_text())["vocab_size"])
        except (OSError, KeyError, ValueError):
            self._vocab = None
        return None

    def _request(self, path: str, body: Optional[dict] = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
        data = None if body is None else json.dumps(body).encode()
        err = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace").strip().replace("\n", " ")
                err = f"HTTP {e.code} {detail}"
                if e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                err = f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(min(2.0 ** attempt, 10.0))
        raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server at {self.url} did not answer {path} "
                          f"({err}) after {self.retries + 1} attempt(s)")

    def _check_server(self, temperature: float, vocab_size: int) -> None:
        if temperature != 1.0:
            raise ConfigError("model.temperature", f"ServerTeacher scores at temperature 1 (a vLLM server's prompt "
                              f"log-probs), the module uses {temperature:g}; set model.temperature: 1.0 or use "
                              "rlad_pl.teacher.LocalTeacher / VLLMTeacher")
        if self._vocab is not None and self._vocab != vocab_size:
            raise ConfigError(FIELD, f"the teacher's output layer has {self._vocab} rows, the shared tokenizer "
                              f"{vocab_size}; the server normalises over all of them; use rlad_pl.teacher.VLLMTeacher")
        if self._checked:
            return
        served = [m.get("id") for m in self._request("/v1/models").get("data", [])]
        if self.model not in served:
            raise ConfigError(f"{FIELD}.init_args.model", f"the teacher server at {self.url} serves {served}, not "
                              f"'{self.model}' (set model to the served id, or start the server on the teacher)")
        self._checked = True

    def _prompt_logprobs(self, batch: RolloutBatch, temperature: float, vocab_size: int, n: int):
        """``POST /v1/completions`` with ``prompt_logprobs: n`` in batches of ``batch_size`` sequences: per sequence
        and response position, the server's ``{"<token id>": {"logprob": ...}}`` entry and the token there."""
        self._check_server(temperature, vocab_size)
        ids, mask, P = teacher_layout(batch)
        rows, keep, compact = _token_rows(ids, mask)
        plps = []
        for s in range(0, len(rows), self.batch_size):
            part = rows[s:s + self.batch_size]
            try:
                res = self._request("/v1/completions", {"model": self.model, "prompt": part, "max_tokens": 1,
                                                        "temperature": 0.0, "prompt_logprobs": n})
            except ConfigError as e:
                if n > 0 and "HTTP 400" in str(e):  # vLLM: "Requested prompt logprobs of n, ... max allowed: m"
                    raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server at {self.url} refused "
                                      f"prompt_logprobs={n} (teacher_top_k); start it with --max-logprobs {n} or "
                                      f"more ({e.message.split('/v1/completions ')[-1]})") from None
                raise
            choices = sorted(res.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(part):
                raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server answered {len(choices)} choices "
                                  f"for {len(part)} prompts")
            plps.extend(c.get("prompt_logprobs") or [] for c in choices)
        return _position_entries(plps, rows, keep, compact, P, ids.shape[1] - P)

    @torch.no_grad()
    def token_logprobs(self, batch, *, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, 0)
        return _sampled_values(entries, lambda e, tok: (e.get(str(tok)) or {}).get("logprob")).to(
            batch.input_ids.device)

    @torch.no_grad()
    def topk(self, batch, *, k, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, k)
        return _topk_values(entries, k, lambda e: {int(t): float(v["logprob"]) for t, v in e.items()}).to(
            batch.input_ids.device)


# ----------------------------------------------------------------------------------------------------------------
# engine answers -> tensors (shared by VLLMTeacher and ServerTeacher)
# ----------------------------------------------------------------------------------------------------------------

def _token_rows(ids: Tensor, mask: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
    """Each sequence's unpadded token list, the keep mask and each kept column's index in its row's list."""
    ids, mask = ids.cpu(), mask.cpu()
    keep = mask > 0
    compact = keep.long().cumsum(-1) - 1
    return [ids[i][keep[i]].tolist() for i in range(ids.shape[0])], keep, compact


def _position_entries(plps: list, rows: list[list[int]], keep: Tensor, compact: Tensor, P: int, R: int):
    """Per sequence, per response position ``t``: ``(entry, token)`` with ``entry`` the engine's prompt-logprob
    entry for the token at ``P + t`` (None when missing) and ``token`` that token (None at padding)."""
    out = []
    for i, (plp, row) in enumerate(zip(plps, rows)):
        seq = []
        for t in range(R):
            if not keep[i, P + t]:
                seq.append((None, None))
                continue
            j = int(compact[i, P + t])
            seq.append((plp[j] if 0 < j < len(plp) else None, row[j]))
        out.append(seq)
    return out


def _sampled_values(entries, value) -> Tensor:
    """``[N, R]`` fp32 sampled-token log-probs: ``value(entry, token)``; NaN when missing, 0 at padding."""
    out = torch.zeros(len(entries), len(entries[0]) if entries else 0, dtype=torch.float32)
    for i, seq in enumerate(entries):
        for t, (entry, tok) in enumerate(seq):
            if tok is not None:
                v = value(entry, tok) if entry else None
                out[i, t] = float(v) if v is not None else float("nan")
    return out


def _topk_values(entries, k: int, as_dict) -> TeacherTopK:
    """``TeacherTopK`` from the engine's entries (``as_dict(entry) -> {token id: log-prob}``): the k largest of
    each (the engine adds the scored token when it is outside its top-k), tail ``log(1 - sum exp)``."""
    R = len(entries[0]) if entries else 0
    return topk_from_entries([[as_dict(e) if e else None for e, _ in seq] for seq in entries], k, R)


def _shutdown_engine(llm, owns_dist: bool) -> None:
    """Stop an in-process engine; destroy torch's default process group only when vLLM created it (the same rule
    as ``VLLMSampler.close``)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if owns_dist and hasattr(client, "shutdown"):
            client.shutdown()
            return
        finalizer = getattr(client, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        core = getattr(client, "engine_core", None)
        if getattr(core, "model_executor", None) is not None:
            core.model_executor.shutdown()
        if getattr(core, "scheduler", None) is not None:
            core.scheduler.shutdown()
        gc.unfreeze()
        from vllm.distributed import parallel_state as ps

        ps.destroy_model_parallel()
    except Exception:  # pragma: no cover - best effort at teardown
        log.debug("VLLMTeacher: engine shutdown failed", exc_info=True)


__all__ = ["TeacherScorer", "LocalTeacher", "VLLMTeacher", "ServerTeacher", "teacher_layout", "TEACHER_INPUTS"]
