"""Credit inside a cross-tokenizer chunk: the teacher's probability of each student token's *characters*, from the
teacher's distribution at the chunk's first position (docs/methods/cross_tokenizer.md, "Inside a chunk").

A chunk (``rlad_pl.teacher.cross_tokenizer``) spells the text ``y[p:q]`` in ``n`` student tokens ending at characters
``p < c_1 < ... < c_n = q`` and in teacher tokens ``u_1..u_m``; its total ``T = sum_j log pi_T(u_j | ...)`` is exact.
Each student token gets the teacher's probability of its characters given the text before them, a ratio of prefix
masses ``F(c) = log P_T(the text after p starts with y[p:c] | x, y[:p])``::

    m_i = F(c_i) - F(c_{i-1})  (F(p) = 0),   and the boundary cost  T - F(q) <= 0  goes to the next chunk's first token

``F(c)``: the mass of the teacher's tokens at the chunk's first position (predicting ``u_1``) whose text starts with
``y[p:c]``, over its top-k and ``u_1``, plus, when ``u_1`` is shorter than ``y[p:c]``, the probability of the
observed tokens ``u_1..u_J`` up to the first that reaches ``c`` (a disjoint event). Both are events that spell the
prefix: a lower bound, exact when every token path to the prefix starts with one token that covers it and is in the
top-k. ``F`` is made non-increasing and kept in ``[T, 0]``, so every value is ``<= 0``; a response's values add up to
``sum_k T_k`` exactly. Student ends inside a character (a partial UTF-8 piece) have no prefix text: the tokens up to
the next whole character share that stretch equally. Chunks of one student and one teacher token keep ``T``
(identical tokenizers: the teacher's values bit for bit).

The boundary cost moves because ``T`` includes "the teacher's token ends here": in ``=1;`` against the teacher's
``=12`` the digit ``1`` is right and the number ending is wrong, which is the ``;``'s doing. Left on the ``1`` it would
make a token's value depend on the student's next token. With equal shares (``T / n`` each) a wrong last digit charged
the correct characters before it, and the demo's student learned to avoid them (validation 60.7 -> 54.1 %; with this
rule 60.7 -> 64.6 %, docs/methods/cross_tokenizer.md).

Pure Python + ``torch``: no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = ["token_texts", "prefix_chunk_values", "map_prefix_logprobs"]

_CACHE = "_rlad_pl_token_texts"


def token_texts(tokenizer) -> list[Optional[str]]:
    """The text each id of ``tokenizer`` spells inside a text (``None``: a special token, or a piece that is not whole
    characters). Decoded after a reference token, so SentencePiece's leading-space marker and byte-level spaces both
    come out as the space they stand for. Cached on the tokenizer object."""
    cached = getattr(tokenizer, _CACHE, None)
    if cached is None or len(cached) != len(tokenizer):
        from rlad_pl.teacher.cross_tokenizer import special_ids

        specials = special_ids(tokenizer)
        ref = [i for i in tokenizer("a", add_special_tokens=False)["input_ids"]][:1] or [0]
        base = tokenizer.decode(ref, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        n = len(tokenizer)
        pairs = tokenizer.batch_decode([ref + [i] for i in range(n)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        out: list[Optional[str]] = []
        for i, s in enumerate(pairs):
            text = s[len(base):] if s.startswith(base) else None
            out.append(None if i in specials or not text or "\ufffd" in text else text)
        try:
            setattr(tokenizer, _CACHE, out)
        except AttributeError:  # a tokenizer that takes no attributes: computed again next time
            return out
        cached = out
    return cached


def _logsumexp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def prefix_chunk_values(text: str, p: int, ends: Sequence[Optional[int]], total: float,
                        teacher_ends: Sequence[Optional[int]], teacher_lp: Sequence[float], first_id: int,
                        top_ids: Sequence[int], top_lp: Sequence[float],
                        texts: Sequence[Optional[str]]) -> tuple[list[float], float]:
    """The values ``m_i`` of one chunk's ``n`` student tokens and the chunk's boundary cost (module docstring):
    ``m_i = F(c_i) - F(c_{i-1})`` up to ``F(q)``, and ``T - F(q) <= 0``, which the caller adds to the next chunk's
    first token.

    ``text``: the response text; ``p``: the chunk's start; ``ends``: each student token's end character (``None``
    inside a character; the last is ``q``); ``total``: ``T``; ``teacher_ends`` / ``teacher_lp``: the chunk's teacher
    tokens' end characters and log-probs; ``first_id``: ``u_1``; ``top_ids`` / ``top_lp``: the teacher's top-k at
    ``u_1``'s position; ``texts``: ``token_texts`` of the teacher's tokenizer.
    """
    n = len(ends)
    candidates = dict(zip((int(i) for i in top_ids), (float(v) for v in top_lp)))
    candidates[int(first_id)] = float(teacher_lp[0])
    first_len = teacher_ends[0] - p if teacher_ends[0] is not None else 0
    cum = 0.0
    path = []  # log-prob of u_1..u_j, with u_j's end
    for e, lp in zip(teacher_ends, teacher_lp):
        cum += float(lp)
        path.append((e, cum))

    def prefix_logprob(c: int) -> float:
        prefix = text[p:c]
        mass = [lp for i, lp in candidates.items() if (t := texts[i]) is not None and t.startswith(prefix)]
        if first_len < c - p:  # u_1 is shorter than the prefix: the observed tokens up to the one reaching c
            mass.append(next(lp for e, lp in path if e is not None and e >= c))
        return _logsumexp(mass)

    # F at the valid ends, non-increasing and within [T, 0]
    f_prev, out, stretch = 0.0, [], 0
    for i, c in enumerate(ends):
        stretch += 1
        if c is None and i < n - 1:
            continue
        f = min(max(prefix_logprob(c), total), f_prev)
        out.extend([(f - f_prev) / stretch] * stretch)
        f_prev, stretch = f, 0
    return out, total - f_prev


def map_prefix_logprobs(al, teacher_lp: Tensor, top_ids: Tensor, top_lp: Tensor,
                        texts: Sequence[Optional[str]]) -> Tensor:
    """``CrossTokenAlignment.map_teacher_logprobs`` with the prefix rule: ``teacher_lp`` ``[R_T]`` (the teacher's
    response tokens), ``top_ids`` / ``top_lp`` ``[R_T, k]`` (its top-k at the same positions) -> ``[R_S]`` (0 where
    unaligned). Chunks of one student and one teacher token keep the teacher's value (so identical tokenizers give
    the teacher's values exactly); every other chunk is split by prefix masses and passes its boundary cost to the
    next chunk's first student token (to its own last token when it is the last chunk)."""
    out = al.map_teacher_logprobs(teacher_lp)
    s_of: dict[int, list[int]] = {}
    u_of: dict[int, list[int]] = {}
    for t, k in enumerate(al.student_chunk):
        if k >= 0:
            s_of.setdefault(k, []).append(t)
    for j, k in enumerate(al.teacher_chunk):
        if k >= 0:
            u_of.setdefault(k, []).append(j)
    if all(len(s_of.get(k, ())) == 1 and len(u_of.get(k, ())) == 1 for k in range(al.num_chunks)):
        return out
    lp, resp = teacher_lp.tolist(), al.teacher_response_ids
    carry = 0.0
    for k in range(al.num_chunks):
        ts, us = s_of[k], u_of[k]
        if len(ts) == 1 and len(us) == 1:
            vals, cost = [lp[us[0]]], 0.0
        else:
            j0 = us[0]
            vals, cost = prefix_chunk_values(al.response_text, al.chunk_spans[k][0], [al.student_ends[t] for t in ts],
                                             sum(lp[j] for j in us), [al.teacher_ends[j] for j in us],
                                             [lp[j] for j in us], resp[j0], top_ids[j0].tolist(), top_lp[j0].tolist(),
                                             texts)
        vals[0] += carry
        carry = cost
        if k == al.num_chunks - 1:
            vals[-1] += carry
        out[ts] = torch.tensor(vals, dtype=out.dtype)
    return out
