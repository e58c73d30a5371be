"""LoRA students (``model.lora``, PEFT): config errors, what the optimizer and checkpoints hold, the frozen base staying
bit-identical, merged / adapter exports against the in-memory PEFT model, exact resume through the CLI, the
adapters-off base as OPSD teacher and KL reference (log-probs of the initial model, one model less in memory),
gradient checkpointing, and training effects (GRPO reward up, OPSD divergence down)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, run_cli, scalars

GRPO_LORA = str(CONFIGS / "grpo_lora_tiny.yaml")
OPSD_LORA = str(CONFIGS / "opsd_lora_tiny.yaml")
TINY = "assets/tiny-student"
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu"]


def _module(objective=None, lora=LORA, **kw):
    from rlad_pl.objectives import GRPO
    from rlad_pl.training.module import DistillationModule

    return DistillationModule(student=TINY, objectives=[objective or GRPO()], lora=lora, **kw)


def _adapter_count(cfg, r: int) -> int:
    """Hand count of LoRA elements with every linear layer of a Qwen2 block targeted: r * (in + out) each."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_block = r * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))  # q, k, v, o, gate, up, down
    return cfg.num_hidden_layers * per_block


def _randomize_adapters(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _batch(tok, texts=("12+7=", "abc", "9*9=", "hello"), response="aab1+2"):
    from rlad_pl.core.batch import build_sequences

    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    resp = [tok(response, add_special_tokens=False)["input_ids"]] * len(prompts)
    return build_sequences(prompts, resp, tok.pad_token_id)


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("spec,field,words", [
    ({"r": 0}, "model.lora.r", "integer >= 1"),
    ({"r": 2.5}, "model.lora.r", "integer >= 1"),
    ({"alpha": -1}, "model.lora.alpha", "> 0"),
    ({"dropout": 1.0}, "model.lora.dropout", "[0, 1)"),
    ({"rank": 8}, "model.lora.rank", "unknown LoraConfig field"),
    ({"alpha": 8, "lora_alpha": 8}, "model.lora.lora_alpha", "given twice"),
    ({"use_dora": True}, "model.lora.use_dora", "not supported"),
    ({"lora_bias": True}, "model.lora.lora_bias", "not merged"),
    ({"modules_to_save": ["lm_head"]}, "model.lora.modules_to_save", "not supported"),
    ({"init_lora_weights": "pissa"}, "model.lora.init_lora_weights", "modify the base weights"),
    ({"target_modules": ["lm_head"]}, "model.lora.target_modules", "LM head"),
    ({"target_modules": ["embed_tokens"]}, "model.lora.target_modules", "only nn.Linear"),
    ({"target_modules": ["no_such_proj"]}, "model.lora.target_modules", "no_such_proj"),
    ([8], "model.lora", "expected a mapping"),
])
def test_bad_lora_config_is_one_line(spec, field, words):
    from rlad_pl.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _module(lora=spec)
    assert e.value.field == field, str(e.value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_lora_config_through_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", GRPO_LORA, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                "--export.enabled", "false", "--model.lora.r", "0")
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlad_pl: error:")]
    assert lines == ["rlad_pl: error: model.lora.r: expected an integer >= 1, got 0"]


def test_export_adapter_without_lora_is_an_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "1",
                "--trainer.default_root_dir", str(tmp_path), "--export.adapter", "true", *QUIET)
    assert exc.value.code == 2
    assert "rlad_pl: error: export.adapter: only a LoRA student" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ optimizer / memory
def test_optimizer_sees_only_the_adapters():
    m = _module(lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    opt = m.configure_optimizers()
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in m.student.named_parameters()}
    assert all("lora_A" in names[id(p)] or "lora_B" in names[id(p)] for p in params)
    cfg = m.student.config
    assert sum(p.numel() for p in params) == _adapter_count(cfg, 4) == 4352  # tiny-student, r=4
    assert len(params) == 2 * 7 * cfg.num_hidden_layers
    # PEFT's default targets for Qwen2 (q_proj, v_proj) when target_modules is not given
    m2 = _module(lora={"r": 2})
    targeted = {n.split(".")[-4] for n, p in m2.student.named_parameters() if p.requires_grad}
    assert targeted == {"q_proj", "v_proj"}


def test_adapters_off_teacher_is_the_initial_model_and_saves_one_model_of_memory():
    from rlad_pl.core.logprobs import response_logprobs
    from rlad_pl.models.loading import load_causal_lm
    from rlad_pl.models.lora import BaseModelView, param_bytes
    from rlad_pl.objectives import GRPO, OPSD
    from rlad_pl.training.module import DistillationModule

    lora_m = DistillationModule(student=TINY, teacher=TINY, objectives=[OPSD()], lora=LORA)
    full_m = DistillationModule(student=TINY, teacher=TINY, objectives=[OPSD()])
    assert isinstance(lora_m.teacher, BaseModelView) and lora_m.reference is None
    _randomize_adapters(lora_m.student)
    initial = load_causal_lm(TINY, "model.student", trainable=False)
    ids, mask, P, rmask = _batch(lora_m.tokenizer)
    with torch.no_grad():
        teacher = lora_m.annotator().logprobs(lora_m.teacher, _rollout(ids, mask, P, rmask))
        student = lora_m.annotator().logprobs(lora_m.student, _rollout(ids, mask, P, rmask))
        ref, _ = response_logprobs(initial, ids, mask, P)
    assert (teacher - ref).abs().max().item() <= 1e-6
    assert (student - ref).abs().max().item() > 1e-2  # the adapters are on for the student ...
    assert lora_m.student.training  # ... and the view leaves the student's train mode alone
    model_bytes = param_bytes(initial)
    adapter_bytes = sum(p.numel() * p.element_size() for p in lora_m.student.parameters() if p.requires_grad)
    lora_total = param_bytes(lora_m.student, lora_m.teacher, lora_m.reference)
    full_total = param_bytes(full_m.student, full_m.teacher, full_m.reference)
    assert full_total == 2 * model_bytes
    assert lora_total == model_bytes + adapter_bytes  # no second copy: one model less than full fine-tuning + teacher
    print(f"\nparameter bytes: full FT + teacher {full_total}, LoRA + base teacher {lora_total} "
          f"(model {model_bytes}, adapters {adapter_bytes})")

    # a KL reference (GRPO ref_kl_coef > 0) is the base view too; a different teacher still loads
    kl_m = _module(objective=GRPO(ref_kl_coef=0.1))
    assert isinstance(kl_m.reference, BaseModelView)
    other = DistillationModule(student=TINY, teacher="assets/tiny-teacher", objectives=[OPSD()], lora=LORA)
    assert isinstance(other.teacher, torch.nn.Module)


def _rollout(ids, mask, P, rmask):
    from rlad_pl.core.batch import RolloutBatch

    n = ids.shape[0]
    return RolloutBatch(input_ids=ids, attention_mask=mask, prompt_len=P, response_mask=rmask,
                        rewards=torch.zeros(n), advantages=torch.zeros(n), group_ids=torch.arange(n))


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    from rlad_pl.core.logprobs import response_logprobs

    grads = []
    for gc in (False, True):
        torch.manual_seed(0)  # the same lora_A initialization
        m = _module(gradient_checkpointing=gc)
        assert m.student.is_gradient_checkpointing == gc and m.student.training
        _randomize_adapters(m.student)
        ids, mask, P, _ = _batch(m.tokenizer)
        logp, _ = response_logprobs(m.student, ids, mask, P)
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None})
        assert all("lora_" in n for n in grads[-1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0])
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6


# ---------------------------------------------------------------------------------------- fit, checkpoint, export
@pytest.fixture(scope="module")
def lora_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_fit")
    cli = run_cli("fit", "--config", GRPO_LORA, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root),
                  "--model.student", TINY, "--data.task.init_args.target", "a", "--export.adapter", "true", *QUIET)
    return cli, Path(cli.trainer.log_dir)


def test_fit_trains_adapters_and_leaves_the_base_bit_identical(lora_fit):
    from rlad_pl.models.loading import load_causal_lm

    cli, _ = lora_fit
    student = cli.model.student
    initial = dict(load_causal_lm(TINY, "model.student").named_parameters())
    base = {n.replace(".base_layer", ""): p for n, p in student.named_parameters() if "lora_" not in n}
    assert base.keys() == initial.keys()
    for n, p in base.items():
        assert torch.equal(p, initial[n]), n
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: every adapter was trained


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(lora_fit):
    cli, log_dir = lora_fit
    ckpt_path = log_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    trainable = {"student." + n for n, p in cli.model.student.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(trainable) and all("exp_avg" in s for s in state.values())
    adapter_bytes = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    model_bytes = sum(p.numel() * p.element_size() for p in cli.model.student.parameters() if not p.requires_grad)
    assert adapter_bytes < model_bytes / 2
    # adapters + 2 AdamW moments + metadata; a full-FT checkpoint of this model alone is > 3 * model_bytes
    assert os.path.getsize(ckpt_path) < 3 * adapter_bytes + 64 << 10


def test_merged_export_and_adapter_folder_match_the_trained_model(lora_fit):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlad_pl.models.loading import load_causal_lm

    cli, log_dir = lora_fit
    export = log_dir / "hf_export"
    assert not any(f.name.startswith("adapter_") for f in export.iterdir())  # the merged folder is plain HF
    student = cli.model.student.eval()
    ids, mask, _, _ = _batch(cli.model.tokenizer)
    with torch.no_grad():
        live = student(input_ids=ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(export).eval()
        assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
        diff_merged = (merged(input_ids=ids, attention_mask=mask).logits - live).abs().max().item()
        peft = PeftModel.from_pretrained(load_causal_lm(TINY, "model.student"), export / "adapter").eval()
        diff_adapter = (peft(input_ids=ids, attention_mask=mask).logits - live).abs().max().item()
        initial = load_causal_lm(TINY, "model.student").eval()
        moved = (initial(input_ids=ids, attention_mask=mask).logits - live).abs().max().item()
    assert diff_merged <= 1e-5 and diff_adapter <= 1e-5, (diff_merged, diff_adapter)
    assert moved > 1e-3  # the comparison is not trivially between two initial models


@pytest.mark.slow
def test_resume_is_exact_through_the_cli(tmp_path):
    """2 epochs, then ``--ckpt_path last`` to 4 epochs == 4 epochs straight (merged exports bit for bit)."""
    from safetensors.torch import load_file

    from rlad_pl.testing.runs import run_fit

    def fit(root, epochs, *extra):
        run_fit(GRPO_LORA, {"trainer.max_epochs": epochs, "data.prompts_per_rollout": 4}, root,
                extra=[*QUIET, *extra], env={"OMP_NUM_THREADS": "1"}, timeout=300)

    fit(tmp_path / "ref", 4)
    fit(tmp_path / "split", 2)
    fit(tmp_path / "split", 4, "--ckpt_path", "last")
    ref = load_file(tmp_path / "ref" / "lightning_logs" / "version_0" / "hf_export" / "model.safetensors")
    res = load_file(tmp_path / "split" / "lightning_logs" / "version_1" / "hf_export" / "model.safetensors")
    half = load_file(tmp_path / "split" / "lightning_logs" / "version_0" / "hf_export" / "model.safetensors")
    assert ref.keys() == res.keys()
    assert max((ref[k] - res[k]).abs().max().item() for k in ref) == 0.0
    assert max((ref[k] - half[k]).abs().max().item() for k in ref) > 0  # epochs 3-4 did train


# ------------------------------------------------------------------------------------------------ training effects
@pytest.mark.slow
def test_lora_grpo_raises_the_reward(tmp_path):
    """configs/grpo_lora_tiny.yaml (demo student, '7' reward): measured 0.19 -> 1.00 over 30 epochs, like full
    fine-tuning (0.21 -> 1.00); 15 epochs here."""
    cli = run_cli("fit", "--config", GRPO_LORA, "--trainer.default_root_dir", str(tmp_path), *QUIET)
    assert cli.model.lora is not None
    reward = scalars(tmp_path, "rollout/reward_mean")
    assert len(reward) == 15
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    print(f"\nLoRA GRPO reward: first 3 epochs {first:.3f}, last 3 {last:.3f}")
    assert last > first + 0.4 and last > 0.8, (first, last)


@pytest.mark.slow
def test_lora_opsd_lowers_the_divergence(tmp_path):
    cli = run_cli("fit", "--config", OPSD_LORA, "--trainer.default_root_dir", str(tmp_path), *QUIET)
    from rlad_pl.models.lora import BaseModelView

    assert isinstance(cli.model.teacher, BaseModelView)
    div = scalars(tmp_path, "renio/opsd/divergence")  # the clipped forward KL to the adapters-off teacher
    assert len(div) == 20
    first, last = sum(div[:3]) / 3, sum(div[-3:]) / 3
    print(f"\nLoRA OPSD divergence: first 3 epochs {first:.4f}, last 3 {last:.4f}")  # measured 0.0050 -> 0.0022
    assert last < 0.7 * first, (first, last)


# ------------------------------------------------------------------------------------------------ vLLM
@pytest.mark.vllm
@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_sync_of_merged_weights_then_greedy_matches_hf(tmp_path):
    """The engine starts from the merged model, the sync sends merged weights in base names bucket by bucket
    (bytes = the base model's), and after adapter training greedy vLLM == greedy HF on the live PEFT student."""
    import time

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.models.lora import apply_lora, param_bytes
    from rlad_pl.rollout import HFSampler, SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler
    from rlad_pl.testing.builders import save_tiny_model

    path = save_tiny_model(tmp_path / "student", seed=0, hidden_size=32, num_layers=2, num_heads=1,
                           intermediate_size=64, max_positions=256)
    tok = load_tokenizer(path)
    student = load_causal_lm(path, "model.student")
    base_bytes = param_bytes(student)
    torch.manual_seed(0)
    apply_lora(student, {"r": 8, "alpha": 16, "target_modules": "all-linear"})
    _randomize_adapters(student, std=0.3)  # the engine must start from the merged weights, not the base
    vs = VLLMSampler(dtype="float32", max_model_len=256, seed=0, sync_bucket_bytes=16 << 10,
                     engine_kwargs={"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 64,
                                    "max_num_batched_tokens": 512})
    hf = HFSampler(batch_size=64)
    try:
        vs.setup(student, tok)
        hf.setup(student, tok)
        prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
                   for t in ["12+7=", "abc", "9*9=", "hello", "x", "42-17="]]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12, n=1, seed=0)
        student.eval()
        start = vs.generate(prompts, greedy).completion_ids
        assert start == hf.generate(prompts, greedy).completion_ids
        names = [n for n, _ in vs._named_weights(student)]
        assert not any("lora" in n or "base_layer" in n for n in names)
        _randomize_adapters(student, seed=1, std=0.3)  # a new adapter state: the engine must follow it
        t0 = time.perf_counter()
        stats = vs.sync_weights(student)
        seconds = time.perf_counter() - t0
        after = vs.generate(prompts, greedy).completion_ids
        assert after == hf.generate(prompts, greedy).completion_ids
        assert sum(a != b for a, b in zip(after, start)) >= len(prompts) // 2
        assert stats["weight_sync_bytes"] == base_bytes  # merged = the base model's size, tied embedding once
        assert stats["weight_sync_buckets"] > 1
        print(f"\nLoRA merged sync: {stats['weight_sync_bytes']:.0f} bytes in {stats['weight_sync_buckets']:.0f} "
              f"buckets, {seconds * 1e3:.1f} ms")
    finally:
        vs.close()


def test_gpu_8b_lora_config_parses():
    """The GPU-scale LoRA OPSD config (never run here: no Qwen3 weights, no GPUs) parses with its LoRA settings."""
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config",
                          str(CONFIGS / "gpu_qwen3_8b_opsd_lora.yaml"), "--print_config"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for needle in ("r: 64", "alpha: 128", "teacher: models/Qwen3-8B", "class_path: rlad_pl.objectives.OPSD",
                   "adapter: true", "class_path: lightning.pytorch.strategies.ModelParallelStrategy"):
        assert needle in out.stdout, needle


# ------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.distributed
def test_fsdp2_two_ranks_match_one(tmp_path):
    """LoRA GRPO under ``ModelParallelStrategy`` on 2 CPU processes == 1 process: sharded adapters train alike,
    sampling goes through the merged unsharded copy, the export gathers and merges the sharded weights."""
    import yaml

    from test_distributed import ATOL, _assert_same_weights, _config, _fit, _moved, _weights

    obj = {"class_path": "rlad_pl.objectives.GRPO", "init_args": {"eps_low": 0.2, "eps_high": 0.28}}

    def config(name, prompts):
        path = _config(tmp_path / f"{name}.yaml", obj, prompts, 3, "token_mean", False, ckpt=False, val=False)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
        cfg["model"]["optimizer"]["init_args"]["lr"] = 1.0e-2
        path.write_text(yaml.safe_dump(cfg))
        return path

    one, two = _weights(_fit(config("one", 4), 1)), _weights(_fit(config("two", 2), 2))
    assert not any("lora" in k or "base_layer" in k for k in two)
    worst = _assert_same_weights(one, two, ATOL)
    assert _moved(two) > 1e-3, "the merged export should differ from the initial model"
    print(f"\nLoRA FSDP2 1 vs 2 ranks: max |diff| {worst:.2e}")


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_resume_from_last_ckpt_is_exact_and_holds_only_adapters(tmp_path):
    """LoRA GRPO on 2 CPU processes under ``ModelParallelStrategy``: 2 epochs, then ``--ckpt_path last`` to 3 ==
    3 epochs straight (merged exports bit for bit); the sharded ``last.ckpt`` holds the adapters and their AdamW
    moments only (no frozen base tensor)."""
    import yaml
    from torch.distributed.checkpoint import FileSystemReader

    from test_distributed import _config, _fit, _weights

    obj = {"class_path": "rlad_pl.objectives.GRPO", "init_args": {"eps_low": 0.2, "eps_high": 0.28}}

    def config(name, epochs):
        path = _config(tmp_path / f"{name}.yaml", obj, 2, epochs, "token_mean", False, ckpt=False, val=False)
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["enable_checkpointing"] = True  # the default RolloutCheckpoint: last.ckpt every epoch
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
        cfg["model"]["optimizer"]["init_args"]["lr"] = 1.0e-2
        path.write_text(yaml.safe_dump(cfg))
        return path

    ref = _weights(_fit(config("ref", 3), 2))
    half_dir = _fit(config("split", 2), 2)
    half = _weights(half_dir)
    ckpt = half_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()  # a distributed checkpoint: one shard file per rank
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("state_dict.")]
    layers, blocks = 7, 2  # q k v o gate up down, tiny-student's 2 blocks
    assert len(model_keys) == 2 * layers * blocks, model_keys
    assert all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys
    opt_keys = [k for k in keys if k.startswith("optimizer_0.state.")]  # AdamW: exp_avg, exp_avg_sq, step
    assert all(".lora_A." in k or ".lora_B." in k for k in opt_keys), opt_keys[:5]
    assert sum(k.endswith(".exp_avg_sq") for k in opt_keys) == 2 * layers * blocks
    res = _weights(_fit(config("split", 3), 2, "--ckpt_path", "last"))
    assert ref.keys() == res.keys() and not any("lora" in k or "base_layer" in k for k in ref)
    assert max((ref[k] - res[k]).abs().max().item() for k in ref) == 0.0
    assert max((ref[k] - half[k]).abs().max().item() for k in ref) > 0  # epoch 3 did train
