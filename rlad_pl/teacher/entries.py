"""Engine answers -> tensors, shared by ``VLLMTeacher`` and ``ServerTeacher``: a batch's teacher layout as unpadded
token lists, the engine's per-position prompt-logprob entries picked out at the response positions, and from them
the ``[N, R]`` sampled-token log-probs or a ``TeacherTopK``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_pl.core.topk import TeacherTopK, topk_from_entries


def _token_rows(ids: Tensor, mask: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
    """Each sequence's unpadded token list, the keep mask and each kept column's index in its row's list."""
    ids, mask = ids.cpu(), mask.cpu()
    keep = mask > 0
    compact = keep.long().cumsum(-1) - 1
    return [ids[i][keep[i]].tolist() for i in range(ids.shape[0])], keep, compact


def _position_entries(plps: list, rows: list[list[int]], keep: Tensor, compact: Tensor, P: int, R: int):
    """Per sequence, per response position ``t``: ``(entry, token)`` with ``entry`` the engine's prompt-logprob
    entry for the token at ``P + t`` (None when missing) and ``token`` that token (None at padding)."""
    out = []
    for i, (plp, row) in enumerate(zip(plps, rows)):
        seq = []
        for t in range(R):
            if not keep[i, P + t]:
                seq.append((None, None))
                continue
            j = int(compact[i, P + t])
            seq.append((plp[j] if 0 < j < len(plp) else None, row[j]))
        out.append(seq)
    return out


def _sampled_values(entries, value) -> Tensor:
    """``[N, R]`` fp32 sampled-token log-probs: ``value(entry, token)``; NaN when missing, 0 at padding."""
    out = torch.zeros(len(entries), len(entries[0]) if entries else 0, dtype=torch.float32)
    for i, seq in enumerate(entries):
        for t, (entry, tok) in enumerate(seq):
            if tok is not None:
                v = value(entry, tok) if entry else None
                out[i, t] = float(v) if v is not None else float("nan")
    return out


def _topk_values(entries, k: int, as_dict) -> TeacherTopK:
    """``TeacherTopK`` from the engine's entries (``as_dict(entry) -> {token id: log-prob}``): the k largest of
    each (the engine adds the scored token when it is outside its top-k), tail ``log(1 - sum exp)``."""
    R = len(entries[0]) if entries else 0
    return topk_from_entries([[as_dict(e) if e else None for e, _ in seq] for seq in entries], k, R)


__all__ = ["_token_rows", "_position_entries", "_sampled_values", "_topk_values"]
