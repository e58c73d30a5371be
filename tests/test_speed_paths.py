"""The fast paths of the training step give what the slow ones give: the decode loop against ``generate``, the
sequence-cut sampler calls, and the update / annotation shortcuts against their plain computation."""

from __future__ import annotations

import pytest
import torch

from rlad_pl.core.batch import pad_rows
from rlad_pl.core.errors import ConfigError
from rlad_pl.models.loading import load_causal_lm, load_tokenizer
from rlad_pl.rollout import HFSampler, SamplingParams
from rlad_pl.rollout.decode import decode


@pytest.fixture(scope="module")
def demo():
    """The shipped demo student (eos is likely, so rows end at different steps) and unequal-length prompts."""
    tok = load_tokenizer("assets/demo-student")
    model = load_causal_lm("assets/demo-student", "model.student").eval()
    prompts = [tok("3+4+1=")["input_ids"], tok("9-2=")["input_ids"], tok("1+1+1+5-2=")["input_ids"],
               tok("7=")["input_ids"]]
    ids, mask = pad_rows(prompts, tok.pad_token_id, "left")
    return model, tok, prompts, ids, mask


def _generate(model, tok, ids, mask, n, max_new, **sampling):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, num_return_sequences=n,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
    out = out[:, ids.shape[1]:]
    return torch.nn.functional.pad(out, (0, max_new - out.shape[1]), value=tok.pad_token_id)  # generate stops early


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.8)])
def test_decode_without_compaction_is_generate_token_for_token(demo, temperature, top_k, top_p):
    model, tok, _, ids, mask = demo
    torch.manual_seed(3)
    ref = _generate(model, tok, ids, mask, 3, 24, do_sample=True, temperature=temperature, top_k=top_k or None,
                    top_p=top_p)
    torch.manual_seed(3)
    got = decode(model, ids, mask, n=3, max_new_tokens=24, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=temperature, top_k=top_k, top_p=top_p, compact=False)
    assert (ref == tok.eos_token_id).any(1).sum() >= 6  # rows do end early: the comparison covers eos handling
    assert torch.equal(got, ref)


def test_decode_with_compaction_greedy_is_generate(demo):
    """Finished rows leave the batch and the KV cache: the remaining rows decode exactly as in the full batch."""
    model, tok, _, ids, mask = demo
    ref = _generate(model, tok, ids, mask, 1, 40, do_sample=False, temperature=None, top_p=None, top_k=None)
    got = decode(model, ids, mask, n=1, max_new_tokens=40, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=0.0)
    ends = (ref == tok.eos_token_id).float().argmax(1)
    assert len(set(ends.tolist())) >= 3  # rows end at different steps: compaction happens mid-loop
    assert torch.equal(got, ref)


def test_decode_with_compaction_sampling_rows_end_at_eos(demo):
    model, tok, _, ids, mask = demo
    torch.manual_seed(0)
    got = decode(model, ids, mask, n=8, max_new_tokens=30, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ended = 0
    for row in got.tolist():
        if eos in row:
            k = row.index(eos)
            assert all(x == pad for x in row[k + 1:]) and pad not in row[:k]
            ended += 1
        else:
            assert pad not in row
    assert ended >= 16


def test_sampler_calls_are_cut_by_sequences(demo):
    """``batch_size`` counts sequences: 4 prompts x 3 samples at 6 sequences per call = 2 calls of 2 prompts; the
    greedy results do not depend on the cut, and the loop equals ``generate``."""
    model, tok, prompts, _, _ = demo
    params = SamplingParams(temperature=0.0, max_new_tokens=30, n=3)
    runs = []
    for batch_size, how in ((6, "loop"), (1, "loop"), (1024, "loop"), (6, "generate")):
        s = HFSampler(batch_size=batch_size, decode=how)
        s.setup(model, tok)
        runs.append(s.generate(prompts, params))
    for r in runs[1:]:
        assert r.completion_ids == runs[0].completion_ids and r.finished == runs[0].finished
    sampled = HFSampler(batch_size=6)
    sampled.setup(model, tok)
    a = sampled.generate(prompts, params.with_(temperature=1.0, seed=5))
    assert a.completion_ids == sampled.generate(prompts, params.with_(temperature=1.0, seed=5)).completion_ids
    assert len(a.completion_ids) == 12


def test_sampler_arguments_checked():
    with pytest.raises(ConfigError, match="batch_size"):
        HFSampler(batch_size=0)
    with pytest.raises(ConfigError, match="decode.*loop, generate"):
        HFSampler(decode="beam")


class _Recording:
    """A task that records which thread asked for which problems."""

    prefetch_safe = True

    def __init__(self, fail_at=None):
        from rlad_pl.data import CharFrequencyTask

        self.inner, self.calls, self.fail_at = CharFrequencyTask(target="a"), [], fail_at

    def problems(self, split, count, offset=0):
        import threading

        self.calls.append((offset, threading.current_thread().name))
        if offset == self.fail_at:
            raise ValueError(f"no problems at {offset}")
        return self.inner.problems(split, count, offset)


def test_next_rollouts_problems_are_prefetched_and_equal():
    from rlad_pl.training.datamodule import RolloutDataModule

    task = _Recording()
    dm = RolloutDataModule(task=task, prompts_per_rollout=3, group_size=1, micro_batch_size=3)
    assert dm.pipeline.problems(0) == task.inner.problems("train", 3, 0)  # nothing prefetched: computed now
    dm.pipeline.prefetch(3)
    got = dm.pipeline.problems(3)
    assert got == task.inner.problems("train", 3, 3)
    assert task.calls[-1][0] == 3 and task.calls[-1][1].startswith("rlad_pl-problems")  # ... by the thread
    # a resumed run asks for another offset than the one prefetched: that one is computed, not the stale list
    dm.pipeline.prefetch(6)
    assert dm.pipeline.problems(9) == task.inner.problems("train", 3, 9)
    assert task.calls[-1] == (9, "MainThread")
    # the task's error reaches the caller, as if problems() had been called there
    task.fail_at = 12
    dm.pipeline.prefetch(12)
    with pytest.raises(ValueError, match="no problems at 12"):
        dm.pipeline.problems(12)
    dm.teardown("fit")
    assert dm.pipeline._prefetcher is None


def test_tasks_that_do_not_declare_prefetch_safe_are_not_prefetched():
    from rlad_pl.training.datamodule import RolloutDataModule

    task = _Recording()
    task.prefetch_safe = False
    dm = RolloutDataModule(task=task, prompts_per_rollout=3, group_size=1, micro_batch_size=3)
    dm.pipeline.prefetch(3)
    assert dm.pipeline._prefetcher is None and dm.pipeline._next_problems is None and task.calls == []
