"""Teachers with another tokenizer for the sampled-token objectives (OPD, KDRL, TRRD, ReNIO): re-tokenize the
student's response as text, align the two tokenizations by character offsets, map the teacher's log-probs back.

Student token ids must never be fed to a teacher with another vocabulary (that trains on garbage, silently). Here the
teacher scores the same *text* in its own tokens:

1. **Re-tokenization** (``align_cross_tokenizer``). The response text is the student's decode of its response ids with
   special tokens skipped. The teacher's input is its own prompt encoding (its chat template with the generation
   prompt when it has one and ``chat=True``, else its BOS + the prompt text) followed by its tokenization of the
   response text, with special-token text split (a response that *writes* ``<|im_end|>`` gets the characters, not the
   control token). A student response ending with an eos id gets the teacher's eos appended. No special token and no
   chat-template text ever enters the teacher's response region; student special tokens inside the response decode to
   no text and are left unaligned.
2. **Boundaries** (``token_boundaries``). Each tokenization of the text ``y`` (length ``L``) has ``n + 1`` boundaries;
   boundary ``i`` (between tokens ``i - 1`` and ``i``) gets a character position when it falls between two characters,
   else ``None``. From the offsets of a fast tokenizer's re-encoding when it reproduces the ids: position = the largest
   end offset so far, valid when no later token starts before it (byte-level pieces of one character repeat its offsets,
   so a boundary inside a character gets ``None``; a gap such as a trimmed leading space goes to the next token). Else
   (a non-canonical sample, a slow tokenizer) by incremental decoding: boundary ``i`` is ``len(decode(ids[:i]))`` when
   that decode is a prefix of ``y``; a prefix ending in a partial UTF-8 character decodes to U+FFFD, so it gets
   ``None`` until the character completes. Boundary ``0`` is ``0`` and boundary ``n`` is ``L``.
3. **Chunks** (``aligned_chunks``). The cut points are the positions present on both sides; consecutive cuts
   ``p < q`` make a chunk: the student tokens ``s_a..s_b`` and the teacher tokens ``u_c..u_d`` between them spell the
   same text ``y[p:q]``. Every common boundary is a cut, so the chunks are the finest that spell the same text on
   both sides. (Zero-width tokens at a cut go to the chunk that starts there, at ``L`` to the last one.) The eos pair
   is a chunk of its own.

**The rule.** The teacher's log-probability of chunk ``k`` (student tokens ``S_k``, ``n_k = |S_k|``; teacher tokens
``U_k``) is, by the chain rule, the teacher's log-probability of the chunk's text after the same text prefix:

    T_k = sum_{j in U_k} log pi_T(u_j | x_T, u_<j) = log pi_T(y[p:q] | x_T, y[:p])

and, in this module, each student token of the chunk gets an equal share (the per-token geometric mean of the chunk's
probability; ``TeacherRoute`` splits chunks by the teacher's prefix masses instead, ``rlad_pl.teacher.cross_prefix``,
and uses these equal shares only with ``cross_top_k: 0``):

    m_t = T_k / n_k            for t in S_k,            so   sum_{t in S_k} m_t = T_k.

``m`` replaces ``log pi_T(y_t | prefix)`` (``batch.teacher_logprobs``, ``[R_S]``). Chunk sums, hence sequence sums
(``sum_t (l_S,t - m_t) = log pi_S(y) - log pi_T(y)``, the sequence log-ratio of KDRL's k1 term and of the reverse-KL
estimates), are exact; identical tokenizations make every chunk one token on each side (``n_k = 1``, ``|U_k| = 1``) so
``m_t`` is bit for bit the teacher's own per-token value. Within a multi-token chunk the split is a convention: a
per-token nonlinear use (k2 / k3 estimators, TRRD's clamp, ReNIO's pivotal threshold) sees the chunk's average.

Rejected alternatives (``docs/methods/cross_tokenizer.md`` has the long form): the whole chunk on its last student
token and 0 on the others (0 reads as "the teacher is certain" to objectives unchanged, nonlinear per-token terms spike
at chunk ends; ``chunk_end_mask`` and ``chunk_logprobs`` still give that form to an objective written for chunks);
shares proportional to the student's log-probs (couples the target to the student, undefined when the chunk's student
sum is 0, needs student log-probs at alignment time); shares by character length (a partial-UTF-8 piece has no
characters, so it would get 0); collapsing each chunk to one position as TRL GOLD does for its distributions (changes
``R_S``, which the objectives index with the student's log-probs).

Pure Python + ``torch``: no model, no Lightning. ``map_teacher_logprobs`` takes the teacher's response log-probs over
``teacher_input_ids[teacher_prompt_len:]`` and returns ``[..., R_S]``; ``student_mask`` says which student tokens
carry a chunk value (unaligned ones get 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["CrossTokenAlignment", "align_cross_tokenizer", "aligned_chunks", "teacher_prompt_ids",
           "token_boundaries", "encode_text", "special_ids"]


@dataclass(frozen=True)
class CrossTokenAlignment:
    """One response, aligned. Lengths: ``R_S`` student response tokens (as given), ``R_T`` teacher response tokens.

    ``student_chunk[t]`` / ``teacher_chunk[j]``: the chunk of each token, ``-1`` when unaligned (student special
    tokens inside the response, an eos without a teacher eos, tokens past the last common boundary).
    ``chunk_spans[k]``: the characters ``(p, q)`` of ``response_text`` chunk ``k`` covers (the eos chunk is
    ``(L, L)``). ``text_roundtrip``: the teacher's decode of its response tokens gives back ``response_text`` (False
    when its normalizer or unknown tokens changed the text; the log-probs are then of another text).
    ``student_boundary_source``: ``"offsets"`` or ``"decode"``, how the student's boundaries were found.
    """

    teacher_input_ids: list[int]
    teacher_prompt_len: int
    response_text: str
    student_chunk: list[int]
    teacher_chunk: list[int]
    chunk_spans: list[tuple[int, int]]
    text_roundtrip: bool = True
    student_boundary_source: str = "offsets"
    #: each student / teacher response token's end character in ``response_text`` (``None``: inside a character,
    #: or unaligned); the eos pair ends at ``L``
    student_ends: list = field(default_factory=list)
    teacher_ends: list = field(default_factory=list)
    _index: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_spans)

    @property
    def teacher_response_ids(self) -> list[int]:
        return self.teacher_input_ids[self.teacher_prompt_len:]

    @property
    def student_mask(self) -> list[bool]:
        """Student tokens carrying a share of a chunk value (the rest map to 0)."""
        return [c >= 0 for c in self.student_chunk]

    @property
    def chunk_end_mask(self) -> list[bool]:
        """The last student token of each chunk (where a chunk-level term ``T_k`` would sit whole)."""
        out = [False] * len(self.student_chunk)
        last: dict[int, int] = {}
        for t, c in enumerate(self.student_chunk):
            if c >= 0:
                last[c] = t
        for t in last.values():
            out[t] = True
        return out

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = str(device)
        if key not in self._index:
            s = torch.tensor(self.student_chunk, dtype=torch.long, device=device)
            u = torch.tensor(self.teacher_chunk, dtype=torch.long, device=device)
            sizes = torch.zeros(self.num_chunks, dtype=torch.long, device=device)
            sizes.index_add_(0, s[s >= 0], torch.ones_like(s[s >= 0]))
            self._index[key] = (s, u, sizes, u >= 0)
        return self._index[key]

    def chunk_logprobs(self, teacher_token_logprobs: Tensor | Sequence[float]) -> Tensor:
        """``T_k = sum_{j in U_k} log pi_T(u_j | ...)``: ``[..., R_T]`` -> ``[..., num_chunks]``."""
        lp = torch.as_tensor(teacher_token_logprobs)
        if not lp.is_floating_point():
            lp = lp.float()
        r_t = len(self.teacher_chunk)
        if lp.ndim == 0 or lp.shape[-1] != r_t:
            raise ValueError(f"teacher_token_logprobs: expected last dimension {r_t} (the teacher's response tokens, "
                             f"teacher_input_ids[teacher_prompt_len:]), got shape {tuple(lp.shape)}")
        _, u, _, keep = self._tensors(lp.device)
        out = lp.new_zeros(lp.shape[:-1] + (self.num_chunks,))
        return out.index_add_(-1, u[keep], lp[..., keep])

    def map_teacher_logprobs(self, teacher_token_logprobs: Tensor | Sequence[float]) -> Tensor:
        """``m_t = T_k / n_k`` for each student token ``t`` of chunk ``k``, 0 where unaligned: ``[..., R_T]`` ->
        ``[..., R_S]`` (same dtype and device)."""
        chunks = self.chunk_logprobs(teacher_token_logprobs)
        s, _, sizes, _ = self._tensors(chunks.device)
        if self.num_chunks == 0:
            return chunks.new_zeros(chunks.shape[:-1] + (len(self.student_chunk),))
        share = chunks / sizes.clamp_min(1).to(chunks.dtype)
        out = share[..., s.clamp_min(0)]
        return torch.where(s >= 0, out, torch.zeros_like(out))


def special_ids(tokenizer) -> set[int]:
    """Ids a decode with ``skip_special_tokens=True`` drops: the tokenizer's special tokens and special added tokens."""
    out = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            out.add(int(i))
    return out


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode_text(tokenizer, text: str) -> tuple[list[int], Optional[list[tuple[int, int]]]]:
    """The tokenizer's ids of ``text`` with no special tokens added and special-token text split into ordinary
    tokens, plus the character offsets when the tokenizer is fast (else ``None``)."""
    kwargs: dict[str, Any] = {"add_special_tokens": False, "split_special_tokens": True}
    try:
        enc = tokenizer(text, return_offsets_mapping=True, **kwargs)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        return list(tokenizer(text, **kwargs)["input_ids"]), None


def _offset_boundaries(offsets: Sequence[tuple[int, int]], length: int) -> list[Optional[int]]:
    n = len(offsets)
    if n == 0:
        return [0]
    later_start = [length] * (n + 1)  # the smallest start offset of tokens i.. (i = n: none)
    for i in range(n - 1, -1, -1):
        later_start[i] = min(offsets[i][0], later_start[i + 1])
    out: list[Optional[int]] = [0]
    end = 0
    for i in range(1, n):
        end = max(end, offsets[i - 1][1])
        out.append(end if end <= later_start[i] else None)
    return out + [length]


def _decode_boundaries(ids: Sequence[int], tokenizer, text: str) -> list[Optional[int]]:
    n = len(ids)
    if n == 0:
        return [0]
    out: list[Optional[int]] = [0]
    last = 0
    for i in range(1, n):
        prefix = _decode(tokenizer, ids[:i])
        ok = text.startswith(prefix) and len(prefix) >= last
        out.append(len(prefix) if ok else None)
        last = len(prefix) if ok else last
    return out + [len(text)]


def token_boundaries(ids: Sequence[int], tokenizer, text: str,
                     offsets: Optional[Sequence[tuple[int, int]]] = None) -> tuple[list[Optional[int]], str]:
    """Character position of each of the ``len(ids) + 1`` token boundaries of ``text`` (``None`` inside a character
    or otherwise not a clean cut) and the method: ``"offsets"`` (from ``offsets``, or from re-encoding ``text`` when
    that reproduces ``ids``) or ``"decode"`` (incremental decoding, ``O(len(ids)^2)``)."""
    ids = list(ids)
    if offsets is None:
        enc_ids, enc_offsets = encode_text(tokenizer, text)
        if enc_ids == ids:
            offsets = enc_offsets
    if offsets is not None and len(offsets) == len(ids):
        return _offset_boundaries(offsets, len(text)), "offsets"
    return _decode_boundaries(ids, tokenizer, text), "decode"


def aligned_chunks(student_bounds: Sequence[Optional[int]],
                   teacher_bounds: Sequence[Optional[int]]) -> list[tuple[int, int, int, int, int, int]]:
    """Maximal aligned chunks ``(s_start, s_end, u_start, u_end, p, q)``: student tokens ``[s_start, s_end)`` and
    teacher tokens ``[u_start, u_end)`` both spell characters ``[p, q)``; cuts are the positions both sides have."""

    def index(bounds: Sequence[Optional[int]]) -> dict[int, int]:
        pos: dict[int, int] = {}
        for i, p in enumerate(bounds):
            if p is not None:
                pos.setdefault(p, i)  # zero-width tokens at a cut join the chunk starting there ...
        pos[bounds[-1]] = len(bounds) - 1  # ... except at the end of the text, where they join the last chunk
        return pos

    s_pos, u_pos = index(student_bounds), index(teacher_bounds)
    cuts = sorted(set(s_pos) & set(u_pos))
    return [(s_pos[p], s_pos[q], u_pos[p], u_pos[q], p, q) for p, q in zip(cuts, cuts[1:])]


def teacher_prompt_ids(teacher_tokenizer, prompt_text: str, chat: bool = False) -> list[int]:
    """The teacher's own prompt: its chat template (one user turn, generation prompt) when ``chat`` and it has one,
    else its BOS (when it has one) + the prompt text."""
    if chat and getattr(teacher_tokenizer, "chat_template", None):
        rendered = teacher_tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}],
                                                         add_generation_prompt=True, tokenize=False)
        return list(teacher_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    bos = getattr(teacher_tokenizer, "bos_token_id", None)
    ids = list(teacher_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    return ([int(bos)] if bos is not None else []) + ids


def align_cross_tokenizer(student_response_ids: Sequence[int], student_tokenizer, teacher_tokenizer,
                          prompt_text: str, *, chat: bool = False, student_eos_ids: Optional[Iterable[int]] = None,
                          teacher_eos_id: Optional[int] = None) -> CrossTokenAlignment:
    """Align one student response with the teacher's tokenization of the same text.

    ``student_response_ids``: the response tokens only (no prompt, no padding), possibly ending with an eos id
    (``student_eos_ids``, default the student tokenizer's eos). ``teacher_eos_id`` (default the teacher tokenizer's
    eos) is appended for it; with none, that student eos stays unaligned. ``chat``: prompt the teacher through its
    chat template (``teacher_prompt_ids``).
    """
    ids = [int(i) for i in (student_response_ids.tolist() if hasattr(student_response_ids, "tolist")
                            else student_response_ids)]
    eos_ids = ({int(i) for i in student_eos_ids} if student_eos_ids is not None
               else {student_tokenizer.eos_token_id} - {None})
    teacher_eos = teacher_eos_id if teacher_eos_id is not None else getattr(teacher_tokenizer, "eos_token_id", None)
    ends_with_eos = bool(ids) and ids[-1] in eos_ids
    skip = special_ids(student_tokenizer) | eos_ids
    body = ids[:-1] if ends_with_eos else ids
    text_pos = [t for t, i in enumerate(body) if i not in skip]  # student positions of text tokens
    text_ids = [body[t] for t in text_pos]
    text = _decode(student_tokenizer, text_ids)

    s_bounds, source = token_boundaries(text_ids, student_tokenizer, text)
    u_ids, u_offsets = encode_text(teacher_tokenizer, text)
    u_bounds, _ = token_boundaries(u_ids, teacher_tokenizer, text, offsets=u_offsets)
    if not text:  # nothing to align: tokens that decode to no text stay unaligned
        chunks = []
    else:
        chunks = aligned_chunks(s_bounds, u_bounds)

    student_chunk = [-1] * len(ids)
    teacher_chunk = [-1] * len(u_ids)
    student_ends: list[Optional[int]] = [None] * len(ids)
    for t, pos in enumerate(text_pos):
        student_ends[pos] = s_bounds[t + 1]
    teacher_ends: list[Optional[int]] = list(u_bounds[1:]) if u_ids else []
    spans: list[tuple[int, int]] = []
    for k, (sa, sb, ua, ub, p, q) in enumerate(chunks):
        for t in range(sa, sb):
            student_chunk[text_pos[t]] = k
        for j in range(ua, ub):
            teacher_chunk[j] = k
        spans.append((p, q))
    u_response = list(u_ids)
    if ends_with_eos and teacher_eos is not None:
        student_chunk[-1] = len(spans)
        teacher_chunk.append(len(spans))
        u_response.append(int(teacher_eos))
        spans.append((len(text), len(text)))
        student_ends[-1] = len(text)
        teacher_ends.append(len(text))

    prompt = teacher_prompt_ids(teacher_tokenizer, prompt_text, chat=chat)
    roundtrip = teacher_tokenizer.decode(u_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    return CrossTokenAlignment(teacher_input_ids=prompt + u_response, teacher_prompt_len=len(prompt),
                               response_text=text, student_chunk=student_chunk, teacher_chunk=teacher_chunk,
                               chunk_spans=spans, text_roundtrip=roundtrip, student_boundary_source=source,
                               student_ends=student_ends, teacher_ends=teacher_ends)
