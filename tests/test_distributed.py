"""FSDP2 on CPU: 2 processes (gloo) under Lightning's ``ModelParallelStrategy`` against 1 process.

Every run goes through the real CLI in a subprocess (Lightning re-executes ``python -m rlad_pl`` for rank 1, or
``torchrun`` starts both ranks). Rollouts use ``data.seed_per_prompt`` so they do not depend on the layout: the
1-process run takes ``prompts_per_rollout=4``, each of the 2 ranks takes 2, and both see the same 4 prompts and the
same samples per step. Micro-batches also differ (4 per step on 1 process, 2 per rank on 2), so the checks cover the
step-wide, cross-rank loss denominators as well as the sharded forward / backward / optimizer / export.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, assert_same_scalars, scalars

pytestmark = pytest.mark.distributed

EPOCHS = 4  # one optimizer step per epoch (one rollout batch)
#: parameter tolerance after EPOCHS AdamW steps, 1 vs 2 processes: only the summation order of gradients differs
#: (reduce-scatter across ranks vs accumulation over micro-batches); measured max |diff| ~2e-6 (AdamW amplifies
#: rounding in small gradients)
ATOL = 2e-5


def _config(path: Path, objective: dict, prompts: int, epochs: int, loss_agg: str, teacher: bool,
            ckpt: bool = True, val: bool = True) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "default_root_dir": str(path.parent / (path.stem + "_runs")),
            "check_val_every_n_epoch": epochs, "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": ckpt, "limit_val_batches": 1.0 if val else 0,
        },
        "model": {
            "student": "assets/tiny-student", "loss_agg": loss_agg, "objectives": [objective],
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3, "weight_decay": 0.0}},
            "grad_clip": 1.0,
        },
        "data": {
            "task": {"class_path": "rlad_pl.data.CharFrequencyTask", "init_args": {"target": "a"}},
            "prompts_per_rollout": prompts, "group_size": 4, "micro_batch_size": 4, "seed_per_prompt": True,
            "sampling": {"temperature": 1.0, "max_new_tokens": 8},
            # greedy validation: the same answers whatever the layout, so Mean@k / Pass@k must match after the
            # cross-rank reduction of the metric states
            "val_sampling": {"temperature": 0.0, "max_new_tokens": 8},
            "val_prompts": 8, "val_k": 1, "correct_threshold": 0.1, "seed": 0,
        },
    }
    if ckpt:  # every epoch, kept: the resume test starts from the middle of a run
        cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "save_top_k": -1, "every_n_epochs": 1, "save_on_train_epoch_end": True}}]
    if teacher:
        cfg["model"]["teacher"] = "assets/tiny-teacher"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, world: int, *extra: str, torchrun: bool = False) -> Path:
    """Run ``fit`` in a subprocess; returns the run's log dir (TensorBoard, checkpoints, hf_export)."""
    args = ["fit", "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", str(world)]
    if world > 1:
        args += ["--trainer.strategy.class_path", "ModelParallelStrategy"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            "-m", "rlad_pl"] if torchrun else [sys.executable, "-m", "rlad_pl"]) + args + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if world > 1 else "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    root = Path(yaml.safe_load(config.read_text())["trainer"]["default_root_dir"])
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    assert versions, out.stderr[-3000:]
    return versions[-1]


def _weights(log_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(log_dir / "hf_export" / "model.safetensors"))


def _moved(weights: dict) -> float:
    from safetensors.torch import load_file

    initial = load_file(str(REPO / "rlad_pl" / "assets" / "tiny-student" / "model.safetensors"))
    return max((weights[k] - initial[k]).abs().max().item() for k in initial if k in weights)


def _assert_same_weights(a: dict, b: dict, atol: float = ATOL) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    obj = {"class_path": "rlad_pl.objectives.GRPO", "init_args": {"eps_low": 0.2, "eps_high": 0.28}}
    one = _fit(_config(tmp / "one.yaml", obj, 4, EPOCHS, "token_mean", False, ckpt=False), 1)
    two_cfg = _config(tmp / "two.yaml", obj, 2, EPOCHS, "token_mean", False)
    two = _fit(two_cfg, 2)
    return one, two, two_cfg


@pytest.fixture(scope="module")
def trrd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trrd")
    obj = {"class_path": "rlad_pl.objectives.TRRD", "init_args": {"alpha": 0.5, "teacher_clamp": 1.0}}
    one = _fit(_config(tmp / "one.yaml", obj, 4, 2, "seq_mean_token_mean", True, ckpt=False, val=False), 1)
    two = _fit(_config(tmp / "two.yaml", obj, 2, 2, "seq_mean_token_mean", True, val=False), 2)
    return one, two


def test_grpo_two_ranks_match_one(grpo):
    one, two, _ = grpo
    base = _weights(one)
    assert _moved(base) > 1e-3  # the steps did change the weights, so the comparison is not vacuous
    _assert_same_weights(base, _weights(two))
    # logged values reduced across ranks: global token count, summed partial losses, mean rewards
    assert_same_scalars(one, two, ("train/tokens", "train/loss", "grpo/loss", "rollout/reward_mean",
                                   "rollout/response_length_max", "train/grad_norm"), EPOCHS)
    # Mean@k / Pass@k (torchmetrics states summed across ranks; each rank scored half of the prompts)
    for tag in ("val/all/mean@1", "val/all/pass@1"):
        assert scalars(two, tag) == pytest.approx(scalars(one, tag), abs=1e-6), tag


def test_trrd_sharded_teacher_matches_one_rank(trrd):
    one, two = trrd
    assert _moved(_weights(one)) > 1e-3
    _assert_same_weights(_weights(one), _weights(two))
    assert_same_scalars(one, two, ("trrd/loss", "train/tokens"))
    # sharded checkpoints hold the student only (frozen teacher shards are not written)
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = sorted((two / "checkpoints").glob("*.ckpt"))[-1]
    assert ckpt.is_dir()  # a distributed checkpoint: one shard file per rank
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    assert any(k.startswith("state_dict.student.") for k in keys)
    assert not any(".teacher." in k or k.startswith("state_dict.teacher") for k in keys)


def test_resume_from_sharded_checkpoint(grpo, tmp_path):
    _, two, cfg = grpo
    ckpt = two / "checkpoints" / "epoch=1-step=2.ckpt"
    assert ckpt.is_dir(), sorted(p.name for p in (two / "checkpoints").iterdir())
    resumed_cfg = tmp_path / "resume.yaml"
    text = yaml.safe_load(cfg.read_text())
    text["trainer"]["default_root_dir"] = str(tmp_path / "resume_runs")
    resumed_cfg.write_text(yaml.safe_dump(text))
    # the other launch route: torchrun starts both ranks, Lightning joins them (TorchElasticEnvironment)
    resumed = _fit(resumed_cfg, 2, "--ckpt_path", str(ckpt), torchrun=True)
    names = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert names == ["epoch=2-step=3.ckpt", "epoch=3-step=4.ckpt"], names  # continued at step 2
    assert len(scalars(resumed, "train/loss")) == EPOCHS - 2
    torch.testing.assert_close(torch.tensor(scalars(resumed, "train/loss")),
                               torch.tensor(scalars(two, "train/loss")[2:]), rtol=1e-5, atol=1e-7)
    _assert_same_weights(_weights(two), _weights(resumed), atol=1e-6)


def test_sharded_hf_export_reloads_and_generates_like_single_process(grpo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one, two, _ = grpo
    outs = []
    for run in (one, two):
        export = run / "hf_export"
        model = AutoModelForCausalLM.from_pretrained(export).eval()
        tok = AutoTokenizer.from_pretrained(export)
        assert all(not any(w in k for w in ("_fsdp", "_orig_mod", "_checkpoint_wrapped")) for k in
                   model.state_dict())
        ids = tok(["<bos>1234", "<bos>9876", "<bos>5555"], return_tensors="pt", add_special_tokens=False)
        outs.append(model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id))
    assert torch.equal(outs[0], outs[1])


def test_sharding_helpers_on_a_plain_model(tiny_dir):
    """The pure parts of rlad_pl.models.distributed: block discovery, the tied-weight guard, names, plain-model
    gathers."""
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.models.distributed import (
        _check_tied,
        clean_name,
        full_state_dict,
        is_sharded,
        iter_full_tensors,
        root_call,
        transformer_blocks,
    )
    from rlad_pl.models.loading import load_causal_lm

    model = load_causal_lm(tiny_dir, "model.student")
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["Qwen2DecoderLayer"] * 2
    _check_tied(model, blocks)  # the tied embedding / LM head sit outside the blocks: one root group
    blocks[0].mlp.up_proj.weight = model.model.embed_tokens.weight
    with pytest.raises(ConfigError, match="tied weights"):
        _check_tied(model, blocks)
    model = load_causal_lm(tiny_dir, "model.student")
    assert clean_name("module._orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.weight") == \
        "model.layers.0.mlp.weight"
    assert not is_sharded(model) and root_call(model, lambda x: x + 1, 1) == 2
    state = full_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # tied: gathered once
    buckets = list(iter_full_tensors(model.named_parameters(), bucket_bytes=1))
    assert len(buckets) == len(list(model.parameters()))  # one tensor per bucket at a 1-byte budget
