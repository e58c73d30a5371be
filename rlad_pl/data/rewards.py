"""Reward callables that replace a task's verifier: ``(completion, problem) -> float``.

Name one in YAML (``data.reward: {class_path: my_module.MyReward}``); any callable class with this signature works.
"""

from __future__ import annotations

from typing import Optional

from rlad_pl.data.tasks import Problem, extract_answer


class Reward:
    def __call__(self, completion: str, problem: Problem) -> float:
        raise NotImplementedError


class ExactMatchReward(Reward):
    """1.0 when the extracted answer equals the reference exactly (``answer_pattern`` group 1), else 0.0."""

    def __init__(self, answer_pattern: Optional[str] = r"#\s*(\S+)\s*$"):
        self.answer_pattern = answer_pattern

    def __call__(self, completion: str, problem: Problem) -> float:
        return float(extract_answer(completion, self.answer_pattern) == problem.answer)


class FormatAnswerReward(Reward):
    """Logic-RL style shaped reward: ``format_bonus`` if the pattern matches (else ``-format_bonus``), plus
    ``correct`` for a right answer and ``wrong`` otherwise."""

    def __init__(self, answer_pattern: str = r"#\s*(\S+)\s*$", format_bonus: float = 1.0, correct: float = 2.0,
                 wrong: float = -1.5, unparseable: float = -2.0):
        self.answer_pattern, self.format_bonus = answer_pattern, format_bonus
        self.correct, self.wrong, self.unparseable = correct, wrong, unparseable

    def __call__(self, completion: str, problem: Problem) -> float:
        answer = extract_answer(completion, self.answer_pattern)
        if not answer:
            return -self.format_bonus + self.unparseable
        return self.format_bonus + (self.correct if answer == problem.answer else self.wrong)
