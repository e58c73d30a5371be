"""Micro-batches trimmed to their own padding (``RolloutBatch.trim_padding``) and ordered by length
(``data.group_by_length``) give the same log-probs and the same step gradient as untrimmed ones."""

from __future__ import annotations

import torch

from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.core.logprobs import response_logprobs
from rlad_pl.testing.builders import build_tiny_qwen2


def _batch(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 18, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (6,), generator=g)]
    resp = [torch.randint(3, 18, (int(n),), generator=g).tolist() + [2]
            for n in torch.randint(1, 12, (6,), generator=g)]
    prompts.append([5])  # one very short row, so the others carry padding
    resp.append([7, 2])
    ids, mask, P, rmask = build_sequences(prompts, resp, 0)
    n = ids.shape[0]
    return RolloutBatch(ids, mask, P, rmask, torch.rand(n, generator=g), torch.randn(n, generator=g),
                        torch.arange(n), teacher_logprobs=-torch.rand(rmask.shape, generator=g),
                        teacher_input_ids=ids.clone(), teacher_attention_mask=mask.clone(), teacher_prompt_len=P)


def test_trim_padding_keeps_real_tokens_and_logprobs():
    torch.manual_seed(0)
    model = build_tiny_qwen2(18, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).eval()
    full = _batch()
    for rows in ([0, 1], [6], [2, 3, 4], list(range(7))):
        mb = full.select(torch.tensor(rows))
        t = mb.trim_padding()
        assert t.input_ids.shape[1] <= mb.input_ids.shape[1]
        assert t.response_mask.sum() == mb.response_mask.sum()
        R = t.response_len
        assert t.response_mask.shape[1] == R == t.teacher_logprobs.shape[1]
        assert t.teacher_input_ids.shape == t.input_ids.shape and t.teacher_prompt_len == t.prompt_len
        torch.testing.assert_close(t.teacher_logprobs, mb.teacher_logprobs[:, :R])
        with torch.no_grad():
            a, _ = response_logprobs(model, mb.input_ids, mb.attention_mask, mb.prompt_len)
            b, _ = response_logprobs(model, t.input_ids, t.attention_mask, t.prompt_len)
        m = t.response_mask.bool()
        torch.testing.assert_close(b[m], a[:, :R][m], atol=1e-5, rtol=1e-5)
        assert mb.response_mask[:, R:].sum() == 0


def test_group_by_length_same_step_gradient():
    """The pipeline's micro-batches (trimmed, ordered by length) give the untrimmed step's gradient."""
    from rlad_pl.objectives.base import Denominators, aggregate
    from rlad_pl.pipeline.steps import make_steps

    torch.manual_seed(0)
    model = build_tiny_qwen2(18, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    full = _batch(1)
    (step,) = make_steps(full, steps_per_rollout=1, ppo_epochs=1, micro_batch_size=2, group_by_length=True,
                         seed=0)
    assert sum(mb.num_sequences for mb in step.micro_batches) == 7
    denom = Denominators(step.num_tokens, float(step.num_sequences), 16.0)

    def grad(batches):
        model.zero_grad()
        for mb in batches:
            lp, _ = response_logprobs(model, mb.input_ids, mb.attention_mask, mb.prompt_len)
            aggregate(-lp * mb.advantages[:, None], mb.response_mask, "seq_mean_token_mean", denom).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    torch.testing.assert_close(grad(step.micro_batches), grad([full]), atol=1e-5, rtol=1e-4)
    widths = [mb.input_ids.shape[1] for mb in step.micro_batches]
    assert sum(w * mb.num_sequences for w, mb in zip(widths, step.micro_batches)) < full.input_ids.numel()


def test_annotate_chunks_trimmed_same_logprobs(tiny_dir):
    """The ``Annotator`` (chunks ordered by length and trimmed) matches one untrimmed forward pass."""
    from rlad_pl.objectives import TRRD
    from rlad_pl.training.module import DistillationModule

    module = DistillationModule(student=str(tiny_dir), teacher=str(tiny_dir), objectives=[TRRD(alpha=0.5)],
                                annotate_batch_size=3)
    ids, mask, P, rmask = build_sequences([[5, 6, 7, 8, 9], [4], [3, 3], [9, 8, 7]], [[5, 2], [6] * 9 + [2], [7, 2],
                                                                                     [8, 8, 8, 2]], 0)
    n = ids.shape[0]
    rollout = RolloutBatch(ids, mask, P, rmask, torch.zeros(n), torch.zeros(n), torch.arange(n))
    module.annotator().annotate(rollout, need_old=True)
    with torch.no_grad():
        want, _ = response_logprobs(module.teacher, ids, mask, P)
    m = rmask.bool()
    assert rollout.teacher_logprobs.shape == rmask.shape
    torch.testing.assert_close(rollout.teacher_logprobs[m], want[m], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want_old, _ = response_logprobs(module.student.eval(), ids, mask, P)
    torch.testing.assert_close(rollout.old_logprobs[m], want_old[m], atol=1e-5, rtol=1e-5)
