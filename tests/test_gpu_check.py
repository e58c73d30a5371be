"""``tools/gpu_check.sh``: the CPU smoke mode runs every phase of the GPU check and writes every field; a missing
runtime dependency with no wheel to install stops it with one line naming the package and the fix."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from conftest import REPO

SCRIPT = str(REPO / "tools" / "gpu_check.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _tiny_params() -> tuple[int, int, int]:
    """(all, non-embedding, LoRA r 64) parameters of the tiny Qwen3 shape (hidden 64, 2 layers, 2 query / 1 KV
    heads of 32, MLP 128, vocab 2048, tied), by hand."""
    h, layers, q, kv, mlp, vocab, r = 64, 2, 2 * 32, 1 * 32, 128, 2048, 64
    per_layer = h * q + 2 * h * kv + q * h + 2 * 32 + 3 * h * mlp + 2 * h  # q k v o, q/k norms, MLP, 2 RMSNorms
    non_emb = layers * per_layer + h  # + final norm
    lora = layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + mlp) + (mlp + h))  # A: r x in, B: out x r
    return vocab * h + non_emb, non_emb, lora


@pytest.mark.slow
def test_cpu_tiny_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", SCRIPT, "--cpu", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-6000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-tiny" and report["model_shape"]["vocab_size"] == 2048
    assert set(report["phases"]) == {"train", "lora", "fit"}
    assert {k: v["status"] for k, v in report["phases"].items()} == {"train": "ok", "lora": "ok", "fit": "ok"}
    n_all, n_non_emb, n_lora = _tiny_params()

    train = report["phases"]["train"]
    assert (train["params"], train["params_non_embedding"]) == (n_all, n_non_emb)
    assert train["strategy"].startswith("ModelParallelStrategy") and train["gradient_checkpointing"] is True
    assert train["logprob_max_abs_diff"] <= 1e-4  # the two LM heads compute the same log-probs
    for mode in ("chunked", "unchunked"):
        m = train[mode]
        assert m["steps"] == 3 and m["timed_steps"] == 2 and len(m["step_s_all"]) == 3
        assert m["tokens_per_s"] == pytest.approx(2 * 48 / m["step_s_median"])
        assert m["tflops_6N"] == pytest.approx(6 * n_all * m["tokens_per_s"] / 1e12)
        assert abs(m["loss_first"] - math.log(2048)) < 0.5  # random init: about uniform over the vocabulary
        assert m["loss_last"] < m["loss_first"]
        assert m["peak_mem_gib"] is None and m["resident_mem_gib"] is None  # CUDA memory only
    assert train["speed_ratio_chunked_vs_unchunked"] == pytest.approx(
        train["chunked"]["tokens_per_s"] / train["unchunked"]["tokens_per_s"])
    assert train["peak_mem_ratio_chunked_vs_unchunked"] is None

    lora = report["phases"]["lora"]
    assert lora["adapters_fp32"] and lora["base_bf16"]
    assert lora["adapter_dtypes_after"] == ["float32"] and lora["base_dtypes_after"] == ["bfloat16"]
    assert lora["optimizer_params_all_adapters"] and lora["optimizer_param_count"] == 2 * 7 * 2  # A, B x 7 x 2
    assert lora["trainable_params"] == n_lora
    assert lora["adapter_grad_norm"]["first"] > 0 and lora["adapter_grad_norm"]["last"] > 0
    assert len(lora["losses"]) == 4 and lora["loss_decreased"] and lora["losses"][-1] < lora["losses"][0]
    assert "peak_mem_vs_full" in lora

    fit = report["phases"]["fit"]
    assert fit["returncode"] == 0 and fit["command"].startswith("python -m rlad_pl fit --config")
    assert "--trainer.strategy.class_path ModelParallelStrategy" in fit["command"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(fit["hf_export_files"])
    assert fit["hf_export_params"] == n_all and fit["hf_export_loads"] is True
    assert len(fit["rewards"]) == 2  # one rollout batch per epoch, 2 epochs
    assert "===== phase fit" in log


def test_missing_dependency_without_wheel(tmp_path):
    """jsonargparse made unimportable (a stub that raises, first on the path) and no wheel for it: exit 2, one line
    naming it, the fetch script and the carry, before any phase runs."""
    stub = tmp_path / "stub" / "jsonargparse"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'jsonargparse'\", "
                                      "name='jsonargparse')\n")
    env = {**ENV, "PYTHONPATH": str(tmp_path / "stub"), "GPU_CHECK_WHEELS": str(tmp_path / "wheels")}
    proc = subprocess.run(["bash", SCRIPT, "--cpu", "--tiny", "--out", str(tmp_path / "r.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: jsonargparse is not importable")
    assert "(missing: jsonargparse)" in lines[0] and "tools/fetch_gpu_wheels.sh" in lines[0] and "carry" in lines[0]
    assert not (tmp_path / "r.json").exists()
