"""The NCCL weight push (``ServerSampler(backend="nccl")``, ``rlad_pl.rollout.nccl_transfer``) as far as a CPU machine
can take it: what it hands vLLM's own NCCL engine passes that engine's metadata/iteration check and carries exactly
the tensors and bytes the gloo push sends; the settings that cannot work are one line before any model loads. The
broadcast itself needs GPUs (docs/servers.md says it has not run on one yet)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO
from rlad_pl.core.errors import ConfigError

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


def _gloo_sent(model, dtype):
    """What the gloo push sends: ``(name, tensor)`` after gathering and casting."""
    from rlad_pl.rollout.gloo_transfer import materialize
    from rlad_pl.rollout.server_client import model_weights

    return [(n, materialize(t, dtype)) for n, t in model_weights(model)]


def test_bad_backends_are_one_line_before_compute():
    from rlad_pl.rollout.server import ServerSampler

    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.backend: expected one of gloo, rlad_gloo, "
                                          r"nccl, got 'tcp'$"):
        ServerSampler(urls="http://127.0.0.1:1", backend="tcp")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.backend: nccl needs a CUDA GPU in the "
                                              r"trainer \(torch sees none\); use gloo"):
            ServerSampler(urls="http://127.0.0.1:1", backend="nccl")
    assert ServerSampler(urls="http://127.0.0.1:1", backend="rlad_gloo").backend == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fit_with_nccl_on_cpu_is_one_line_before_the_model_loads():
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", str(CONFIGS / "grpo_tiny_server.yaml"),
                          "--data.sampler.init_args.backend", "nccl"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("rlad_pl: error")]
    assert lines == ["rlad_pl: error: data.sampler.init_args.backend: nccl needs a CUDA GPU in the trainer (torch "
                     "sees none); use gloo, which pushes through CPU memory on any device"], out.stderr
    assert "Loading weights" not in out.stderr  # refused before the student loads
    assert "Traceback" not in out.stderr


@needs_vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("student", ["plain", "lora"])
def test_the_nccl_source_passes_vllms_check_and_sends_what_gloo_sends(student, dtype):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from rlad_pl.models.loading import load_causal_lm
    from rlad_pl.rollout.nccl_transfer import weight_source
    from rlad_pl.rollout.server_client import model_weights

    torch.manual_seed(0)
    model = load_causal_lm("assets/tiny-student", "model.student")
    if student == "lora":
        from rlad_pl.models.lora import apply_lora

        apply_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})  # in place
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # merged weights differ from the base's
    source = weight_source(lambda: model_weights(model), dtype)
    meta = source.metadata()
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))  # vLLM's own metadata/iteration check
    expected = _gloo_sent(model, dtype)
    assert [n for n, _ in sent] == [n for n, _ in expected] == [m.name for m in meta]
    assert all(m.dtype == dtype and t.dtype == dtype for m, (_, t) in zip(meta, sent))
    for (name, got), (_, want) in zip(sent, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert source.sent_tensors == len(expected)
    assert source.sent_bytes == sum(t.numel() * t.element_size() for _, t in expected)
    if student == "lora":  # the merged weight, under the base's name, is what the push carries
        base = load_causal_lm("assets/tiny-student", "model.student")
        name = next(n for n, _ in sent if n.endswith("q_proj.weight"))
        assert not torch.equal(dict(sent)[name].float(), dict(base.named_parameters())[name].float())
        assert not any("lora" in n for n, _ in sent)
