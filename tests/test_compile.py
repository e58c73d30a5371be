"""``model.compile``: compiled backbones give the eager losses and gradients (to fp32 rounding), leave modules and
checkpoints untouched, and are refused in one line where they cannot run."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars
from rlad_pl.core.batch import RolloutBatch
from rlad_pl.models.compiled import backbone, is_compiled
from rlad_pl.objectives import KDRL, OPDFullVocab
from rlad_pl.objectives.base import Denominators
from rlad_pl.training.module import DistillationModule


def _module(compile: bool) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(student="assets/tiny-student", teacher="assets/tiny-teacher",
                              objectives=[OPDFullVocab(), KDRL(kd_coef=0.1)], loss_agg="token_mean",
                              compile=compile)


def _batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(1)
    n, p, r = 6, 5, 9
    ids = torch.randint(3, vocab, (n, p + r), generator=g)
    mask = torch.ones(n, p + r, dtype=torch.long)
    mask[:2, :2] = 0  # left-padded prompts
    resp = torch.ones(n, r)
    resp[3:, 6:] = 0  # responses of different lengths
    mask[3:, p + 6:] = 0
    b = RolloutBatch(input_ids=ids, attention_mask=mask, prompt_len=p, response_mask=resp,
                     rewards=torch.zeros(n), advantages=torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0]),
                     group_ids=torch.arange(n))
    return b


def _loss_and_grads(m: DistillationModule, batch: RolloutBatch):
    with torch.no_grad():
        batch.old_logprobs = m.annotator().logprobs(m.student, batch)  # a no-grad pass too (its own compiled graph)
        batch.teacher_logprobs = m.annotator().teacher_logprobs(batch)
    loss, _, _ = m.compute_loss(batch, Denominators.of(batch.response_mask))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None}


@pytest.mark.slow  # torch.compile of every objective: ~55 s on 2 busy cores
def test_compiled_losses_and_gradients_equal_eager():
    eager, comp = _module(False), _module(True)
    assert not is_compiled(eager.student) and is_compiled(comp.student) and is_compiled(comp.teacher)
    assert backbone(eager.student) is eager.student.model  # eager: the module itself
    assert backbone(comp.student) is not comp.student.model
    # the models are the same modules: same parameters, same state dict keys (no ``_orig_mod`` prefixes)
    assert list(eager.state_dict()) == list(comp.state_dict())
    batch = _batch(eager.vocab_size)
    le, ge = _loss_and_grads(eager, batch)
    lc, gc = _loss_and_grads(comp, _batch(eager.vocab_size))
    assert le.abs().item() > 1e-3  # a loss that carries signal
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    assert ge.keys() == gc.keys() and len(ge) > 0
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)
    # the compiled graph really ran (and was not silently the eager module)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1


def test_compiled_fit_logs_the_eager_first_step(tmp_path):
    """``--model.compile true`` from the CLI: the first step (same rollouts) logs the eager loss and grad norm."""
    logs = {}
    for flag in ("false", "true"):
        root = tmp_path / flag
        run_cli("fit", "--config", str(CONFIGS / "opd_full_tiny.yaml"), "--trainer.max_epochs", "2",
                "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0",
                "--export.enabled", "false", "--trainer.enable_checkpointing", "false", "--model.compile", flag)
        logs[flag] = {t: scalars(root, t) for t in ("train/loss", "train/grad_norm")}
    for tag in ("train/loss", "train/grad_norm"):
        assert len(logs["true"][tag]) == 2
        assert logs["true"][tag][0] == pytest.approx(logs["false"][tag][0], rel=1e-5, abs=1e-7)


def test_compile_refused_under_model_parallel_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "opd_full_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                "--trainer.strategy.class_path", "ModelParallelStrategy", "--model.compile", "true")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlad_pl: error: model.compile: not supported with ModelParallelStrategy (FSDP2) yet; "
        "set model.compile: false")
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
