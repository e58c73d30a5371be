"""Credit inside a cross-tokenizer chunk (rlad_pl/teacher/cross_prefix.py): each student token of a chunk gets the
teacher's probability of its characters, ``m_i = F(c_i) - F(c_{i-1})`` from prefix masses at the chunk's first teacher
position; chunk sums stay the teacher's log-probability of the text. Hand-built tokenizers and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_pl.teacher.cross_prefix import map_prefix_logprobs, prefix_chunk_values, token_texts
from rlad_pl.teacher.cross_tokenizer import align_cross_tokenizer
from rlad_pl.testing.builders import build_char_tokenizer
from test_cross_tokenizer import byte_bpe, ids, regex_tokenizer

L = math.log


def _top(tok, rows: int, at: dict[int, dict[str, float]], k: int = 4):
    """Top-k tensors ``[rows, k]``: at row j the given token -> probability entries, the rest a special token
    (``<unk>``, no text) at probability 0."""
    top_ids = torch.zeros(rows, k, dtype=torch.long)
    top_lp = torch.full((rows, k), -1e4)
    for j, entries in at.items():
        for c, (t, p) in enumerate(entries.items()):
            top_ids[j, c], top_lp[j, c] = tok.convert_tokens_to_ids(t), L(p)
    return top_ids, top_lp


def test_a_wrong_last_digit_is_charged_to_that_digit_alone():
    """Student ``=`` ``1`` ``3`` (char-level), teacher token ``=13`` at probability 0.05, where the teacher puts 0.9 on
    ``=12`` and 0.04 on ``=1``: ``=`` gets log 0.99, ``1`` log(0.99 / 0.99) = 0, ``3`` log(0.05 / 0.99); equal shares
    would give each of the three log(0.05) / 3."""
    student, teacher = build_char_tokenizer(), regex_tokenizer(["=12", "=13", "=1"])
    s_ids = ids(student, "=13")
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["=13"]
    lp = torch.tensor([L(0.05)])
    top_ids, top_lp = _top(teacher, 1, {0: {"=12": 0.9, "=13": 0.05, "=1": 0.04}})
    got = map_prefix_logprobs(al, lp, top_ids, top_lp, token_texts(teacher))
    want = torch.tensor([L(0.99), 0.0, L(0.05 / 0.99)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert abs(got.sum().item() - L(0.05)) < 1e-6  # the chunk's total is the teacher's log-prob of "=13"
    torch.testing.assert_close(al.map_teacher_logprobs(lp), torch.full((3,), L(0.05) / 3))


def test_a_first_teacher_token_shorter_than_the_prefix_adds_the_observed_path():
    """Student ``h`` ``el`` ``lo``, teacher ``he`` ``llo`` (one chunk: no common cut inside). At the chunk's start the
    teacher gives ``he`` 0.5, ``help`` 0.3, ``h`` 0.1; ``llo`` after ``he`` has 0.6. F(h) = log 0.9 (all three),
    F(hel) = log(0.3 + 0.5 * 0.6) (``help``, plus the observed ``he`` ``llo``: ``he`` alone is shorter than the
    prefix), F(hello) = T = log 0.3."""
    student, teacher = regex_tokenizer(["el", "lo"]), regex_tokenizer(["he", "llo", "help"])
    al = align_cross_tokenizer(ids(student, "hello"), student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["he", "llo"]
    assert al.student_chunk == [0] * 3 and al.teacher_chunk == [0, 0]
    lp = torch.tensor([L(0.5), L(0.6)])
    top_ids, top_lp = _top(teacher, 2, {0: {"he": 0.5, "help": 0.3, "h": 0.1}})
    got = map_prefix_logprobs(al, lp, top_ids, top_lp, token_texts(teacher))
    torch.testing.assert_close(got, torch.tensor([L(0.9), L(0.6 / 0.9), L(0.3 / 0.6)]), rtol=0, atol=1e-6)


def test_a_chunk_that_ends_passes_its_boundary_cost_to_the_next_token():
    """Student ``=`` ``1`` ``,`` where the teacher writes ``=1`` then ``,`` and, at ``=1``'s position, puts 0.7 on
    ``=12``, 0.2 on ``=1``, 0.05 on ``=``: ``=`` gets log 0.95, ``1`` log(0.9 / 0.95) (the digit is right), and the
    number ending there (``=1`` whole, 0.2 of the 0.9 that starts with ``=1``) is charged to ``,``, the character that
    ends it: log(0.2 / 0.9) + the teacher's own value of ``,``."""
    student, teacher = build_char_tokenizer(), regex_tokenizer(["=12", "=1", "="])
    al = align_cross_tokenizer(ids(student, "=1,"), student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["=1", ","]
    lp = torch.tensor([L(0.2), L(0.5)])
    top_ids, top_lp = _top(teacher, 2, {0: {"=12": 0.7, "=1": 0.2, "=": 0.05}})
    got = map_prefix_logprobs(al, lp, top_ids, top_lp, token_texts(teacher))
    want = torch.tensor([L(0.95), L(0.9 / 0.95), L(0.2 / 0.9) + L(0.5)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert abs(got.sum().item() - lp.sum().item()) < 1e-6  # the response's total is the teacher's


def test_one_token_chunks_keep_the_teachers_values_exactly():
    """The limiting case: identical tokenizers make every chunk one token; the prefix rule changes nothing."""
    tok = build_char_tokenizer()
    s_ids = ids(tok, "12+3=15") + [tok.eos_token_id]
    al = align_cross_tokenizer(s_ids, tok, tok, "q")
    lp = -torch.rand(len(s_ids)) * 5
    top_ids, top_lp = _top(tok, len(s_ids), {})
    assert torch.equal(map_prefix_logprobs(al, lp, top_ids, top_lp, token_texts(tok)), lp)


def test_partial_utf8_pieces_share_the_stretch_up_to_a_whole_character():
    """Student bytes ``Ã`` ``©`` ``a`` (``éa``, the first byte ends inside ``é``), teacher one token ``éa`` at 0.5 and
    ``é`` at 0.3: the two bytes share F(é) = log 0.8, ``a`` gets log(0.5 / 0.8)."""
    student, teacher = byte_bpe(), byte_bpe([("Ã", "©"), ("Ã©", "a")])
    s_ids = ids(student, "éa")
    assert len(s_ids) == 3
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["Ã©a"] and al.student_ends[0] is None
    top_ids, top_lp = _top(teacher, 1, {0: {"Ã©a": 0.5, "Ã©": 0.3}})
    got = map_prefix_logprobs(al, torch.tensor([L(0.5)]), top_ids, top_lp, token_texts(teacher))
    torch.testing.assert_close(got, torch.tensor([L(0.8) / 2, L(0.8) / 2, L(0.5 / 0.8)]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_values_are_log_probabilities_and_add_up_to_the_chunk(seed):
    """Whatever the top-k says (inconsistent masses, the observed token missing, prefixes it cannot see), every value
    is <= 0 and the chunk's values add up to its teacher log-probability exactly."""
    g = torch.Generator().manual_seed(seed)
    texts = ["a", "ab", "abc", "abcd", "b", "bc", "c", "cd", "d", None]
    text = "abcd"
    n_teacher = int(torch.randint(1, 4, (1,), generator=g))
    cuts = sorted(torch.randperm(3, generator=g)[:n_teacher - 1].add(1).tolist()) + [4]
    teacher_lp = (-torch.rand(n_teacher, generator=g) * 4).tolist()
    top_lp = torch.log_softmax(torch.randn(len(texts), generator=g) * 2, 0).tolist()
    ends = [1, 2, None, 4] if seed % 2 else [1, 2, 3, 4]
    vals, cost = prefix_chunk_values(text, 0, ends, sum(teacher_lp), cuts, teacher_lp,
                                     texts.index(text[:cuts[0]]), list(range(len(texts))), top_lp, texts)
    assert len(vals) == 4 and all(v <= 1e-7 for v in [*vals, cost])
    assert abs(sum(vals) + cost - sum(teacher_lp)) < 1e-5


def test_the_route_splits_chunks_by_prefix_and_cross_top_k_0_shares_equally():
    """Through ``TeacherRoute`` with a real (tiny) teacher model: values differ from equal shares inside multi-token
    chunks, are log-probabilities, keep each response's total; ``cross_top_k=0`` gives the equal shares."""
    from test_cross_tokenizer import _student_batch, _teacher_route

    stok = build_char_tokenizer()
    ttok = byte_bpe([("1", "2"), ("=", "3"), (";", "#")])
    batch = _student_batch(stok, ["1+2=", "30+4="], ["12+1=3;#34", "34;#34"])
    route = _teacher_route(ttok, cross=True, seed=1)
    kw = dict(temperature=1.0, chunk_size=4, vocab_size=len(stok))
    with torch.no_grad():
        prefix = route.token_logprobs(batch, **kw)
        route.cross_top_k = 0
        equal = route.token_logprobs(batch, **kw)
    for i, r in enumerate(["12+1=3;#34", "34;#34"]):
        al = align_cross_tokenizer(ids(stok, r) + [stok.eos_token_id], stok, ttok, batch.prompt_texts[i])
        n = len(al.student_chunk)
        assert abs(prefix[i, :n].sum() - equal[i, :n].sum()) < 1e-5  # the response's total is kept
        multi = [k for k in range(al.num_chunks) if al.student_chunk.count(k) > 1]
        assert multi
        for k in multi:
            ts = [t for t, c in enumerate(al.student_chunk) if c == k]
            assert not torch.allclose(prefix[i, ts], equal[i, ts])
        assert (prefix[i, :n] <= 0).all()
