"""vLLM rollouts of a LoRA student with ``VLLMSampler(lora_sync="adapter")``: the engine holds the frozen base with
vLLM's LoRA on and a sync sends only the adapter. Greedy vLLM == greedy HF on the live PEFT student at start and
after every sync (fresh LoRA ids, prefix caching on, rsLoRA scaling), bytes = the adapter's; what vLLM's LoRA cannot
express is refused in one line before an engine starts; a CLI fit logs the adapter-sized syncs and their seconds."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import CONFIGS, REPO, run_cli, scalars
from test_lora import _adapter_count

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TINY = "assets/tiny-student"
ENGINE = {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 64, "max_num_batched_tokens": 512}
TEXTS = ["12+7=", "abc", "9*9=", "hello", "x", "42-17="]


def _student(lora):
    """The tiny student with ``lora`` injected (adapter init seeded)."""
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.models.lora import apply_lora

    path = str(REPO / "rlad_pl" / TINY)
    student = load_causal_lm(path, "model.student")
    torch.manual_seed(0)
    apply_lora(student, lora)
    return student, load_tokenizer(path)


def _set_adapters(model, seed, std=0.3):
    """New random lora_A and lora_B (B starts at 0, so an untrained adapter would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.slow
def test_adapter_sync_then_greedy_matches_hf():
    from rlad_pl.rollout import HFSampler, SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler

    student, tok = _student({"r": 4, "alpha": 8, "target_modules": "all-linear", "use_rslora": True})
    _set_adapters(student, seed=0)  # the engine must start with this adapter, not the bare base
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in student.named_parameters() if p.requires_grad)
    assert adapter_bytes == 4 * _adapter_count(student.config, 4) == 17408  # fp32, r * (in + out) per module
    vs = VLLMSampler(dtype="float32", max_model_len=256, seed=0, lora_sync="adapter", enable_prefix_caching=True,
                     engine_kwargs=ENGINE)
    hf = HFSampler(batch_size=64)
    try:
        vs.setup(student, tok)
        hf.setup(student, tok)
        student.eval()
        prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12, n=1, seed=0)
        start = vs.generate(prompts, greedy).completion_ids
        assert start == hf.generate(prompts, greedy).completion_ids
        assert vs._lora_request.lora_int_id == 1
        lora = vs.llm.llm_engine.vllm_config.lora_config
        assert lora.max_lora_rank == 8 and lora.max_loras == 1  # smallest vLLM rank >= r 4
        for seed in (1, 2):  # same prompts again: a stale prefix cache or adapter would replay the old answers
            _set_adapters(student, seed=seed)
            stats = vs.sync_weights(student)
            after = vs.generate(prompts, greedy).completion_ids
            assert after == hf.generate(prompts, greedy).completion_ids, seed
            assert sum(a != b for a, b in zip(after, start)) >= len(prompts) // 2, seed
            assert stats["weight_sync_bytes"] == adapter_bytes and stats["weight_sync_buckets"] == 1
            assert stats["weight_sync_tensors"] == 2 * 7 * student.config.num_hidden_layers
            assert vs._lora_request.lora_int_id == 1 + seed  # a fresh id per sync
            start = after
        ids = vs.llm.collective_rpc(lambda w: sorted(w.model_runner.lora_manager.list_adapters()))
        assert ids == [[3]]  # the previous adapters were dropped, not cached
    finally:
        vs.close()


@pytest.mark.parametrize("lora,kwargs,field,words", [
    ({"r": 4, "target_modules": "all-linear", "bias": "all"}, {}, "model.lora.bias", "only lora_A / lora_B"),
    ({"r": 513, "target_modules": ["q_proj"]}, {}, "model.lora.r", "up to 512"),
    ({"r": 16, "target_modules": ["q_proj"]}, {"engine_kwargs": {"max_lora_rank": 8}},
     "data.sampler.init_args.engine_kwargs.max_lora_rank", "above max_lora_rank 8"),
    (None, {}, "data.sampler.init_args.lora_sync", "no trainable adapters"),
])
def test_what_vllm_lora_cannot_serve_is_refused_before_the_engine_starts(lora, kwargs, field, words):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout.vllm import VLLMSampler

    if lora is None:
        path = str(REPO / "rlad_pl" / TINY)
        student, tok = load_causal_lm(path, "model.student"), load_tokenizer(path)
    else:
        student, tok = _student(lora)
    vs = VLLMSampler(dtype="float32", max_model_len=256, lora_sync="adapter", **kwargs)
    with pytest.raises(ConfigError) as e:
        vs.setup(student, tok)
    assert e.value.field == field, str(e.value)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert vs.llm is None  # refused before an engine was started (max_lora_rank: before it was built)
    vs.close()


@pytest.mark.parametrize("kwargs,field", [
    ({"lora_sync": "delta"}, "data.sampler.init_args.lora_sync"),
    ({"lora_sync": "adapter", "enable_sleep_mode": True, "sleep_level": 2}, "data.sampler.init_args.sleep_level"),
])
def test_bad_lora_sync_arguments(kwargs, field):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.rollout.vllm import VLLMSampler

    with pytest.raises(ConfigError) as e:
        VLLMSampler(**kwargs)
    assert e.value.field == field


@pytest.mark.slow
def test_cli_fit_with_adapter_sync_logs_adapter_bytes_and_seconds(tmp_path):
    """configs/grpo_lora_tiny.yaml with the vLLM sampler in adapter mode, 3 rollout batches: every sync sends the
    adapter alone (its bytes, one RPC), the seconds are logged, and the engine's log-probs of the sampled tokens are
    the trainer's (the mismatch metric near 0: the engine really samples from base + adapter)."""
    sampler = ('{"class_path": "rlad_pl.rollout.vllm.VLLMSampler", "init_args": {"dtype": "float32", '
               '"max_model_len": 160, "lora_sync": "adapter", "engine_kwargs": {"kv_cache_memory_bytes": 67108864, '
               '"max_num_seqs": 128}}}')
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_lora_tiny.yaml"), "--trainer.max_epochs", "3",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "false",
                  "--trainer.check_val_every_n_epoch", "100", "--export.enabled", "false",
                  "--data.sampler", sampler, "--trainer.enable_progress_bar", "false")
    adapter = sum(p.numel() * p.element_size() for p in cli.model.student.parameters() if p.requires_grad)
    assert scalars(tmp_path, "sync/weight_sync_bytes") == [float(adapter)] * 3
    assert scalars(tmp_path, "sync/weight_sync_buckets") == [1.0] * 3
    seconds = scalars(tmp_path, "timing/weight_sync")
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    diff = scalars(tmp_path, "mismatch/logprob_abs_diff_max")  # trainer vs engine log-probs right after a sync
    assert len(diff) == 3 and max(diff) < 1e-4, diff
    assert cli.datamodule.sampler._lora_id == 4  # setup + 3 syncs, each under a fresh id
