"""The embedded Hugging Face sampler: grouping, eos handling, seeds, greedy with n > 1."""

from __future__ import annotations

import torch

from rlad_pl.models.loading import load_causal_lm, load_tokenizer
from rlad_pl.rollout import HFSampler, SamplingParams


def _sampler():
    tok = load_tokenizer("assets/tiny-student")
    model = load_causal_lm("assets/tiny-student", "model.student")
    s = HFSampler(batch_size=3)
    s.setup(model, tok)
    s.sync_weights(model)
    return s, tok


def test_groups_seeds_and_finished_flags():
    s, tok = _sampler()
    prompts = [[tok.bos_token_id, 5, 6], [tok.bos_token_id, 7], [tok.bos_token_id, 8, 9, 10], [tok.bos_token_id]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    a, b = s.generate(prompts, params), s.generate(prompts, params)
    assert len(a.completion_ids) == 12 and a.completion_ids == b.completion_ids  # seeded
    c = s.generate(prompts, params.with_(seed=12))
    assert c.completion_ids != a.completion_ids
    for row, done in zip(a.completion_ids, a.finished):
        assert 1 <= len(row) <= 6
        assert done == (row[-1] == tok.eos_token_id) and tok.eos_token_id not in row[:-1]


def test_greedy_with_several_samples_repeats_the_greedy_answer():
    s, tok = _sampler()
    prompts = [[tok.bos_token_id, 5], [tok.bos_token_id, 9, 9]]
    one = s.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5, n=1))
    three = s.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5, n=3))
    assert three.completion_ids == [r for r in one.completion_ids for _ in range(3)]
    assert three.finished == [f for f in one.finished for _ in range(3)]
    # greedy equals the argmax of the model's own logits
    model = s.model
    ids = torch.tensor([prompts[0]])
    for tok_id in one.completion_ids[0]:
        nxt = int(model(ids).logits[0, -1].argmax())
        assert nxt == tok_id
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
