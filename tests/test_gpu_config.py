"""The GPU-scale example config parses (it is never run here: no Qwen3 weights, no GPUs)."""

from __future__ import annotations

import subprocess
import sys

from conftest import CONFIGS, REPO


def test_gpu_qwen3_trrd_config_parses():
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config",
                          str(CONFIGS / "gpu_qwen3_8b_to_1p7b_trrd.yaml"), "--print_config"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for needle in ("class_path: lightning.pytorch.strategies.ModelParallelStrategy", "devices: 8",
                   "class_path: rlad_pl.objectives.TRRD", "class_path: rlad_pl.rollout.vllm.VLLMSampler",
                   "fsdp_mixed_precision: bf16", "tokenizer: models/Qwen3-1.7B", "teacher_dtype: bfloat16"):
        assert needle in text, needle
