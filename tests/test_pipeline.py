"""The rollout pipeline runs as plain Python: problems -> responses -> scores -> advantages -> batch -> annotation
-> optimizer steps, with no ``Trainer``, no ``LightningModule`` and no data module."""

from __future__ import annotations

import torch

from rlad_pl.core.advantages import group_advantages
from rlad_pl.core.logprobs import response_logprobs
from rlad_pl.data import CharFrequencyTask
from rlad_pl.models.loading import load_causal_lm, load_tokenizer
from rlad_pl.objectives import GRPO, SFT, TRRD, Denominators
from rlad_pl.objectives.plan import plan_objectives
from rlad_pl.pipeline import Annotator, Policy, RolloutPipeline, RolloutSettings
from rlad_pl.rollout.sampler import SamplingParams

ASSETS = "assets/tiny-student", "assets/tiny-teacher"


def _policy(objectives, teacher=False):
    tok = load_tokenizer(ASSETS[0])
    student = load_causal_lm(ASSETS[0], "model.student")
    plan = plan_objectives(objectives)
    teacher_model = load_causal_lm(ASSETS[1], "model.teacher", trainable=False) if teacher else None
    backend = None
    if teacher:
        from rlad_pl.teacher import LocalTeacher

        backend = LocalTeacher()
        backend.model = teacher_model
    annotator = Annotator(student, plan.inputs, teacher=backend, vocab_size=len(tok), batch_size=5)
    return Policy(student, tok, annotator, plan, teacher=teacher_model, teacher_tag="tiny-teacher")


def _pipeline(settings=None, **kw):
    settings = settings or RolloutSettings(prompts_per_rollout=3, group_size=4, micro_batch_size=5,
                                           steps_per_rollout=2, sampling=SamplingParams(max_new_tokens=6), seed=3)
    return RolloutPipeline(CharFrequencyTask(target="a"), settings, info=lambda s: None, **kw)


def test_one_rollout_batch_without_a_trainer():
    pipe = _pipeline()
    policy = _policy([GRPO()])
    pipe.connect(policy)
    steps = pipe.steps(epoch=0)
    assert len(steps) == 2 and all(s.max_response_len == 6 for s in steps)
    assert sum(s.num_sequences for s in steps) == 12
    assert [mb.num_sequences for mb in steps[0].micro_batches] == [5, 1]  # 6 sequences per step, micro-batches of 5
    stats, samples = steps[0].stats, steps[0].samples
    assert steps[1].stats is None and samples and "timing/annotate" in stats
    # the scores are the task's verifier on the decoded responses, the advantages their group normalization
    batch = pipe.rollout(pipe.problems(0), seed=pipe.settings.rollout_seed(0, 0), step=0).batch
    problems = [p for p in pipe.problems(0) for _ in range(4)]
    texts = policy.tokenizer.batch_decode([row[m.bool()].tolist() for row, m in
                                           zip(batch.response_ids, batch.response_mask)], skip_special_tokens=True)
    want = torch.tensor([pipe.task.verify(t, p) for t, p in zip(texts, problems)])
    torch.testing.assert_close(batch.rewards, want)
    torch.testing.assert_close(batch.advantages, group_advantages(want, 4))
    assert stats["rollout/reward_mean"] == batch.rewards.mean().item()  # same seed -> same batch
    # two updates share the batch: the annotator filled the old policy's log-probs, equal to a direct forward
    old = torch.cat([torch.cat([mb.old_logprobs for mb in s.micro_batches]) for s in steps])
    assert old.shape[0] == 12 and torch.isfinite(old).all()
    mb = steps[0].micro_batches[0]
    with torch.no_grad():
        direct, _ = response_logprobs(policy.student.eval(), mb.input_ids, mb.attention_mask, mb.prompt_len)
    m = mb.response_mask.bool()
    torch.testing.assert_close(mb.old_logprobs[m], direct[m], atol=1e-5, rtol=1e-5)


def test_the_steps_train_the_student():
    """Optimizer steps on the pipeline's steps with the objective's own loss lower that loss."""
    from rlad_pl.objectives.base import StudentOutputs

    settings = RolloutSettings(prompts_per_rollout=2, group_size=2, micro_batch_size=3,
                               sampling=SamplingParams(max_new_tokens=20))
    pipe = _pipeline(settings)
    policy = _policy([SFT(prefix_source="dataset")])
    pipe.connect(policy)
    obj = SFT(prefix_source="dataset")
    obj.loss_agg = "token_mean"
    opt = torch.optim.AdamW(policy.student.parameters(), lr=1e-2)
    policy.student.train()
    (step,) = pipe.steps(epoch=0)
    denom = Denominators(step.num_tokens, float(step.num_sequences), float(step.max_response_len))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        total = 0.0
        for mb in step.micro_batches:
            logp, _ = response_logprobs(policy.student, mb.input_ids, mb.attention_mask, mb.prompt_len)
            loss = obj.compute(mb, StudentOutputs(logprobs=logp), denom).loss
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses


def test_sync_once_per_weight_version_and_teacher_annotation():
    pipe = _pipeline()
    policy = _policy([TRRD(alpha=0.5)], teacher=True)
    pipe.connect(policy)
    assert pipe.sync(0) and pipe.sync(0) == {}  # one sync per optimizer step
    assert "timing/weight_sync" in pipe.sync(1)
    (step, *_) = pipe.steps(epoch=1, step=1)
    mb = step.micro_batches[0]
    with torch.no_grad():
        want, _ = response_logprobs(policy.teacher, mb.input_ids, mb.attention_mask, mb.prompt_len)
    m = mb.response_mask.bool()
    torch.testing.assert_close(mb.teacher_logprobs[m], want[m], atol=1e-5, rtol=1e-5)


def test_dataset_responses_are_the_reference_solutions():
    settings = RolloutSettings(prompts_per_rollout=2, group_size=2, micro_batch_size=4,
                               sampling=SamplingParams(max_new_tokens=20))
    pipe = _pipeline(settings)
    pipe.connect(_policy([SFT(prefix_source="dataset")]))
    (step,) = pipe.steps(epoch=0)
    mb = step.micro_batches[0]
    tok = pipe.tokenizer
    for row, m in zip(mb.response_ids, mb.response_mask):
        assert tok.decode(row[m.bool()].tolist(), skip_special_tokens=True) == "a" * 8
    assert step.stats["rollout/reward_mean"] == 1.0  # the reference solution is all 'a'
