"""The shipped demo models (``rlad_pl/assets/demo-teacher``, ``demo-student``): the teacher is much better than the
student on held-out chain_sum problems, and both match the accuracies written on their model cards.

Greedy decoding on the 512 test problems (64 per difficulty level) with the project's own evaluation
(``rlad_pl.training.validate.evaluate_policy``: ``HFSampler`` + ``ChainSumTask.verify`` + ``MeanPassAtK``). Greedy
decoding is deterministic up to floating-point ties, so the card's numbers must be reproduced within 1.5 pp overall
and 6 pp per level (a different BLAS / thread count may flip a handful of near-tied tokens).
"""

from __future__ import annotations

import json

import pytest
import torch

from rlad_pl.data.chain_sum import ChainSumTask
from rlad_pl.models.loading import PACKAGE_DIR, load_causal_lm, load_tokenizer
from rlad_pl.pipeline.evaluate import evaluate_policy

ASSETS = PACKAGE_DIR / "assets"
LEVELS = [f"{t}t{d}d" for t in range(2, 6) for d in (1, 2)]


@pytest.fixture(scope="module")
def greedy():
    out = {}
    for name in ("demo-teacher", "demo-student"):
        path = ASSETS / name
        model, tok = load_causal_lm(path, "model"), load_tokenizer(path)
        out[name] = evaluate_policy(model, tok, ChainSumTask(), "test", 512, k=1, temperature=0.0)
    return out


def card(name: str) -> dict:
    return json.loads((ASSETS / name / "eval.json").read_text())


def test_assets_small_and_loadable():
    size = sum(f.stat().st_size for name in ("demo-teacher", "demo-student") for f in (ASSETS / name).iterdir())
    assert size < 10e6, size
    t, s = load_causal_lm(ASSETS / "demo-teacher", "t"), load_causal_lm(ASSETS / "demo-student", "s")
    tok = load_tokenizer(ASSETS / "demo-student")
    assert len(tok) == 18 and tok.get_vocab() == load_tokenizer(ASSETS / "demo-teacher").get_vocab()
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, s))
    assert n_t == card("demo-teacher")["params"] and n_s == card("demo-student")["params"]
    assert n_t > 5 * n_s
    # the prompt/response characters all map to real ids (no <pad>/unk)
    p = ChainSumTask().problems("test", 8)[7]
    ids = tok(p.prompt + p.solution, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(p.prompt + p.solution) and min(ids) >= 3


@pytest.mark.slow  # the `greedy` fixture evaluates both demo models on the test split: ~80 s on 2 busy cores
def test_teacher_much_better_than_student(greedy):
    t, s = greedy["demo-teacher"], greedy["demo-student"]
    # card numbers: teacher ~0.9, student ~0.4 (greedy, all levels)
    assert t["all/mean@1"] >= 0.85, t["all/mean@1"]
    assert 0.25 <= s["all/mean@1"] <= 0.5, s["all/mean@1"]
    assert t["all/mean@1"] - s["all/mean@1"] >= 0.35
    # the gap is in the 2-digit levels: the student gets few of them, the teacher most
    for lvl in ("2t2d", "3t2d", "4t2d", "5t2d"):
        assert s[f"{lvl}/mean@1"] <= 0.25 and t[f"{lvl}/mean@1"] >= s[f"{lvl}/mean@1"] + 0.4, lvl


@pytest.mark.slow  # the `greedy` fixture (above)
@pytest.mark.parametrize("name", ["demo-teacher", "demo-student"])
def test_matches_model_card(greedy, name):
    got, want = greedy[name], card(name)["greedy"]
    assert abs(got["all/mean@1"] - want["all/mean@1"]) <= 0.015, (got["all/mean@1"], want["all/mean@1"])
    for lvl in LEVELS:
        assert abs(got[f"{lvl}/mean@1"] - want[f"{lvl}/mean@1"]) <= 0.06, (lvl, got, want)
    readme = (ASSETS / name / "README.md").read_text()
    assert f"**{100 * want['all/mean@1']:.1f}**" in readme
    assert torch.isfinite(torch.tensor(got["response_length_mean"]))
