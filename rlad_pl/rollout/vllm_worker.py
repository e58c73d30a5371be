"""Worker-side functions of ``VLLMSampler``, run inside the engine through ``LLM.collective_rpc`` (module level so
they pickle by reference when the engine runs in another process).

**Weight sync** (``_worker_start_update`` / ``_worker_load_bucket`` / ``_worker_finish_update``): one RPC opens a
layerwise reload session, one RPC per bucket loads it (``model.load_weights``, which handles vLLM's fused
``qkv_proj`` / ``gate_up_proj`` layouts), one RPC finalizes it (re-running the kernel-format processing, e.g. the CPU
GEMM weight prepacking). The tied ``lm_head`` kernel is refreshed after the session (vLLM's layerwise reload only
re-processes one owner of a tied tensor; on CPU the ``lm_head`` keeps a prepacked copy that would stay stale).

**Padded vocabularies** (``_worker_mask_padded_vocab``). When the engine's vocabulary (LM-head rows, e.g. Qwen3's
151,936) exceeds the tokenizer's ``V = len(tokenizer)`` (151,669), the model's ``compute_logits`` is wrapped so ids
``>= V`` get ``-inf``: greedy, temperature, top-k / top-p and the reported log-probs all work over the first ``V``
ids, the trainer's ``log_softmax(logits[:V] / T)``. (``SamplingParams.allowed_token_ids`` is no substitute: vLLM's
model runner V2 caps it at 1,024 ids, and it would cost a 151k-id list per request.)

**Which log-probs** (``_worker_install_logprob_hook``). vLLM's default ``logprobs_mode="raw_logprobs"`` reports
``log_softmax(logits)`` *before* temperature, and ``"processed_logprobs"`` reports them after temperature *and* after
top-k / top-p filtering, renormalised over the kept tokens (so they carry ``-log(kept mass)``). The trainer computes
``log_softmax(logits / T)`` over the full vocabulary. The sampler therefore runs the engine with
``processed_logprobs`` (exactly the trainer's quantity when top-k / top-p are off) and installs this small hook so
that, when top-k / top-p are on, the reported value is still ``log_softmax(logits / T)`` taken *before* the filter.

**LoRA adapters** (``_worker_lora_modules``, ``_worker_set_adapter``): the engine's LoRA-capable modules, and an
adapter built from tensors (no disk) that replaces the previous one under a fresh id.
"""

from __future__ import annotations

import torch


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
        _refresh_tied_head(model)
    runner = worker.model_runner
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        fn = getattr(runner, reset, None)
        if callable(fn):
            fn()


def _refresh_tied_head(model) -> None:
    """After a layerwise reload: re-derive a tied ``lm_head``'s kernel copy (vLLM re-processes only one owner of a
    tied tensor; on CPU the head keeps a prepacked copy that would stay stale). Called inside the vLLM config."""
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
