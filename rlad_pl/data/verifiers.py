"""Answer checking for math datasets with ``math-verify``: GSM8K's ``#### 42`` and MATH's ``\\boxed{...}``.

``MathVerifier()(completion, problem)`` returns 1.0 when the completion's final answer equals the problem's reference
answer mathematically (``math_verify.verify``: ``3/4 == 0.75 == \\frac{3}{4}``, ``1,000 == 1000``, ``x^2+1 ==
1+x^2``), else 0.0. The final answer of a text is, in order: the last match of ``answer_pattern`` (when set), the
text after the last GSM8K marker ``####`` (first line), or what ``math_verify.parse`` extracts from the whole text
(the last ``\\boxed{}`` first, then the last LaTeX / plain expression). References are read the same way, so a
GSM8K ``answer`` column (worked solution ending ``#### 18``) and a MATH ``solution`` column (``... \\boxed{18}``) can
be used directly as the answer field.

A custom verifier is any callable ``(completion: str, problem: Problem) -> float``: a class with ``__call__``
(instantiated from YAML by ``class_path`` / ``init_args``) or a plain function named by its import path. It
receives the ``Problem`` with ``problem.answer`` (the answer column as text) and ``problem.metadata["row"]`` (the
full dataset row), e.g.::

    data:
      task:
        class_path: rlad_pl.data.DatasetTask
        init_args:
          path: data/train.parquet
          verifier: {class_path: my_rewards.UnitAwareVerifier, init_args: {tolerance: 0.01}}
"""

from __future__ import annotations

import re
from typing import Optional

from rlad_pl.data.tasks import Problem

GSM8K_MARKER = "####"


def final_answer(text: str, answer_pattern: Optional[str] = None) -> str:
    """The final-answer part of ``text`` (see the module docstring); ``text`` itself when nothing narrows it."""
    if answer_pattern is not None:
        matches = list(re.finditer(answer_pattern, text, flags=re.DOTALL))
        if not matches:
            return ""
        m = matches[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()
    if GSM8K_MARKER in text:
        tail = text.rsplit(GSM8K_MARKER, 1)[1].strip()
        return tail.splitlines()[0].strip().replace(",", "") if tail else ""
    return text


def _timeout(seconds: int):
    """math-verify's timeouts use ``signal.alarm``, which only the main thread may set: elsewhere (asynchronous
    rollouts score in a worker thread) it raises, which would score every answer 0. Off the main thread: none."""
    import threading

    return seconds if threading.current_thread() is threading.main_thread() else None


def _parse(text: str, reference: bool = False):
    from math_verify import parse

    if reference and "$" not in text and "\\" not in text:
        text = f"${text}$"  # a bare reference like "3/4" or "x^2+1" parses best as inline LaTeX
    return parse(text, parsing_timeout=_timeout(5))


def math_equal(completion_answer: str, reference_answer: str) -> bool:
    """``math_verify.verify(parse(reference), parse(completion))``; an unparseable input is not equal."""
    from math_verify import verify

    if not completion_answer.strip() or not reference_answer.strip():
        return False
    try:
        return bool(verify(_parse(reference_answer, reference=True), _parse(completion_answer),
                           timeout_seconds=_timeout(5)))
    except Exception:  # math-verify raises on pathological inputs: an unparseable answer is wrong
        return False


class MathVerifier:
    """1.0 when the completion's final answer equals the reference answer (``math-verify``), else 0.0.

    Args:
        answer_pattern: optional regex applied to the completion first (group 1 of its last match is the answer,
            e.g. ``"Answer:\\s*(.+)"``); the reference is always read with the default rules.
    """

    def __init__(self, answer_pattern: Optional[str] = None):
        self.answer_pattern = answer_pattern

    def __call__(self, completion: str, problem: Problem) -> float:
        guess = final_answer(completion, self.answer_pattern)
        return float(math_equal(guess, final_answer(problem.answer)))


__all__ = ["MathVerifier", "final_answer", "math_equal"]
