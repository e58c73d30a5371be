"""``ChainSumTask``: reasoning-gym ``chain_sum`` in a compact chain-of-thought format for char-level models (demo).

    prompt    77+46-46-73-48=                                   (the expression without spaces, then "=")
    solution  77+46=123;123-46=77;77-73=4;4-48=-44;#-44          (one step per operator, the answer after '#')
    answer    -44                                               (verifier: exact match of the text after the last '#')
    difficulty 5t2d                                             (number of terms, number of digits)

Every character is one of ``0-9 + - = ; #``, so the 18-id char tokenizer of the shipped demo models
(``<pad> <bos> <eos>`` + 15 characters, :data:`CHAIN_SUM_CHARS`) covers prompts and responses. Train, val and test
draw from reasoning-gym with far-apart seeds (items use ``Random(seed + idx)``). Validation and test problems are
stratified: problem ``i`` belongs to difficulty level ``i mod L`` (levels ordered ``2t1d, 2t2d, 3t1d, ...``), drawn
from a per-level reasoning-gym dataset, so every level gets the same number of held-out problems.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from rlad_pl.core.errors import ConfigError
from rlad_pl.data.tasks import Problem, Split, Task

#: characters of the chain_sum format (the demo tokenizer is ``<pad> <bos> <eos>`` followed by these)
CHAIN_SUM_CHARS = list("0123456789+-=;#")

_ANSWER = re.compile(r"#([^#]*)$")


def chain_of_thought(expression: str) -> tuple[str, str, str]:
    """``"77 + 46 - 46"`` -> (prompt ``"77+46-46="``, solution ``"77+46=123;123-46=77;#77"``, answer ``"77"``)."""
    tokens = expression.split()
    acc = int(tokens[0])
    steps = []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        new = acc + int(num) if op == "+" else acc - int(num)
        steps.append(f"{acc}{op}{num}={new}")
        acc = new
    answer = str(acc)
    return "".join(tokens) + "=", ";".join(steps + [f"#{answer}"]), answer


def parse_answer(completion: str) -> Optional[str]:
    """Text after the last ``#`` (stripped), or None when there is no ``#``."""
    m = _ANSWER.search(completion)
    return m.group(1).strip() if m else None


class ChainSumTask(Task):
    """reasoning-gym ``chain_sum`` with chain-of-thought reference solutions and exact-match verification.

    Args:
        min_terms, max_terms: number of operands per expression (reasoning-gym ``chain_sum`` config).
        min_digits, max_digits: digits per operand (all operands of one expression share it).
        seeds: base seed per split (default train 0, val 1e9, test 2e9; items use ``Random(seed + idx)``, so seeds
            must be far apart).
        train_size: size of the train dataset (items are generated on demand; offsets wrap around).
        stratified_eval: val / test problems cycle through the difficulty levels (equal count per level); False:
            draw them like the train split.
    """

    prefetch_safe = True  # problems() is a pure function of its arguments

    def __init__(self, min_terms: int = 2, max_terms: int = 5, min_digits: int = 1, max_digits: int = 2,
                 seeds: Optional[dict[str, int]] = None, train_size: int = 100_000_000, stratified_eval: bool = True):
        if not 2 <= min_terms <= max_terms:
            raise ConfigError(f"{self.field}.min_terms", f"expected 2 <= min_terms <= max_terms, got {min_terms} "
                              f"and {max_terms}")
        if not 1 <= min_digits <= max_digits:
            raise ConfigError(f"{self.field}.min_digits", f"expected 1 <= min_digits <= max_digits, got "
                              f"{min_digits} and {max_digits}")
        self.min_terms, self.max_terms, self.min_digits, self.max_digits = min_terms, max_terms, min_digits, max_digits
        self.seeds = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000, **(seeds or {})}
        self.train_size, self.stratified_eval = train_size, stratified_eval
        self.levels = [(t, d) for t in range(min_terms, max_terms + 1) for d in range(min_digits, max_digits + 1)]
        self._datasets: dict[Any, Any] = {}

    @property
    def source_tag(self) -> str:
        """The generator of the problems (recorded with the run): reasoning-gym's ``chain_sum`` at its version."""
        import reasoning_gym

        version = getattr(reasoning_gym, "__version__", None)
        return "reasoning_gym/chain_sum" + (f"@{version}" if version else "")

    @staticmethod
    def level_name(num_terms: int, num_digits: int) -> str:
        return f"{num_terms}t{num_digits}d"

    def _dataset(self, split: Split, level: Optional[tuple[int, int]] = None):
        key = (split, level)
        if key not in self._datasets:
            import reasoning_gym

            if level is None:
                cfg = dict(min_terms=self.min_terms, max_terms=self.max_terms, min_digits=self.min_digits,
                           max_digits=self.max_digits)
                seed, size = self.seeds[split], self.train_size
            else:  # one dataset per level; its seed is offset by 10M per level index (no overlap below 10M items)
                cfg = dict(min_terms=level[0], max_terms=level[0], min_digits=level[1], max_digits=level[1])
                seed, size = self.seeds[split] + 10_000_000 * (1 + self.levels.index(level)), 10_000_000
            self._datasets[key] = reasoning_gym.create_dataset("chain_sum", seed=seed, size=size, **cfg)
        return self._datasets[key]

    def _entry(self, split: Split, i: int) -> dict:
        if split != "train" and self.stratified_eval:
            L = len(self.levels)
            ds = self._dataset(split, self.levels[i % L])
            return ds[(i // L) % len(ds)]
        ds = self._dataset(split)
        return ds[i % len(ds)]

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        out = []
        for i in range(offset, offset + count):
            entry = self._entry(split, i)
            meta = entry["metadata"]
            prompt, solution, answer = chain_of_thought(meta["expression"])
            if answer != str(entry["answer"]):  # the format must agree with reasoning-gym's own answer
                raise AssertionError(f"chain_sum: {meta['expression']} -> {answer}, reasoning-gym says "
                                     f"{entry['answer']}")
            out.append(Problem(prompt=prompt, answer=answer,
                               difficulty=self.level_name(meta["num_terms"], meta["num_digits"]),
                               solution=solution, metadata={"expression": meta["expression"], "index": i}))
        return out

    def verify(self, completion: str, problem: Problem) -> float:
        return float(parse_answer(completion) == problem.answer)
