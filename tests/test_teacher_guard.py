"""Teacher compatibility guard: a teacher with another vocabulary or other special tokens serves the sampled-token
objectives through re-tokenized text and is refused, in one line, for full-vocabulary ones; padded embeddings are
handled."""

from __future__ import annotations

import pytest
import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import TRRD, ForwardKL
from rlad_pl.testing.builders import build_char_tokenizer, build_tiny_qwen2, save_tiny_model
from rlad_pl.training.module import DistillationModule


def test_different_vocabularies_fail_in_one_line_for_full_vocabulary_objectives(tmp_path):
    student = save_tiny_model(tmp_path / "s")
    teacher = save_tiny_model(tmp_path / "t", chars=list("0123456789xyz"))
    with pytest.raises(ConfigError) as exc:
        DistillationModule(student=str(student), teacher=str(teacher), objectives=[ForwardKL()])
    msg = str(exc.value)
    assert msg.startswith("model.teacher: teacher and student vocabularies differ") and "\n" not in msg
    assert "only in student" in msg and "sampled-token objective (OPDSampled, KDRL, TRRD, ReNIO)" in msg
    # a sampled-token objective scores re-tokenized text instead (rlad_pl.teacher.routes)
    module = DistillationModule(student=str(student), teacher=str(teacher), objectives=[TRRD()])
    assert module.routes["teacher"].cross


def test_different_special_tokens_fail(tmp_path):
    student = save_tiny_model(tmp_path / "s")
    tok = build_char_tokenizer()
    tok.eos_token = "#"  # same vocabulary, different eos id
    teacher = tmp_path / "t"
    build_tiny_qwen2(len(tok)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    with pytest.raises(ConfigError, match=r"^model\.teacher: teacher and student special tokens differ: eos_token_id"):
        DistillationModule(student=str(student), teacher=str(teacher), objectives=[ForwardKL()])
    assert DistillationModule(student=str(student), teacher=str(teacher), objectives=[TRRD()]).routes["teacher"].cross


def test_missing_teacher_names_the_field(tmp_path):
    student = save_tiny_model(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"^model\.teacher: TRRD needs a teacher model path"):
        DistillationModule(student=str(student), objectives=[TRRD()])


def test_padded_teacher_embedding_uses_shared_tokenizer_range(tmp_path):
    student = save_tiny_model(tmp_path / "s")
    tok = build_char_tokenizer()
    padded = build_tiny_qwen2(len(tok) + 13, hidden_size=64, num_heads=4, seed=3)  # rows past the tokenizer
    teacher = tmp_path / "t"
    padded.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    module = DistillationModule(student=str(student), teacher=str(teacher), objectives=[ForwardKL()])
    assert module.vocab_size == len(tok)
    assert module.teacher.get_output_embeddings().weight.shape[0] == len(tok) + 13
    # give the padded rows huge logits: they must not leak into the teacher distribution
    with torch.no_grad():
        module.teacher.get_output_embeddings().weight[len(tok):] = 50.0
    from rlad_pl.core.batch import RolloutBatch, build_sequences
    from rlad_pl.objectives.base import Denominators

    ids, mask, P, rmask = build_sequences([[1, 5], [1, 6]], [[7, 8, 2], [9, 2]], 0)
    batch = RolloutBatch(ids, mask, P, rmask, torch.zeros(2), torch.zeros(2), torch.arange(2))
    loss, metrics, _ = module.compute_loss(batch, Denominators.of(rmask))
    assert torch.isfinite(loss) and 0 <= metrics["forwardkl/fkl"] < 5.0  # log|V| ~ 4 bounds a sane KL here
    assert not any(p.grad is not None for p in module.teacher.parameters())
