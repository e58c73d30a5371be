"""Tasks: where prompts, reference answers and verifiers come from.

* ``ReasoningGymTask``: any ``reasoning-gym`` dataset with its config; train / val / test are disjoint seeds; the
  dataset's own ``score_answer`` is the verifier (or exact match, see ``exact_match``).
* ``JSONLTask``: one JSON object per line with configurable prompt / answer fields, answers checked with
  ``math-verify``.
* ``CharFrequencyTask``: random prompts and a reward a random tiny model can climb (smoke tests, ``grpo_tiny``).

Any task's reward can be replaced by a ``Reward`` (a callable ``(completion, problem) -> float``) named by
``class_path`` in ``data.reward``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_int

Split = Literal["train", "val", "test"]


@dataclass
class Problem:
    prompt: str  # user-facing prompt text (before any chat template)
    answer: str = ""  # reference answer
    difficulty: Optional[str] = None  # bucket name for per-difficulty metrics
    privileged: Optional[str] = None  # privileged context (reference solution) for self-distillation
    solution: Optional[str] = None  # reference response text (dataset prefixes: supervised fine-tuning)
    metadata: dict[str, Any] = field(default_factory=dict)
    teacher: Optional[str] = None  # name of the teacher that scores it (``model.teachers``); None: the default


class Task:
    """Base class: ``problems(split, count, offset)`` and ``verify(completion, problem) -> float``."""

    #: the field name of this task in the config, for error messages
    field = "data.task"
    #: ``problems("train", ...)`` may run in a background thread while the trainer updates (the next rollout's
    #: problems are prepared during this one's update: ``RolloutDataModule``). Set it on a task whose
    #: ``problems`` is a pure function of its arguments and safe beside ``verify`` / other splits; off by default.
    prefetch_safe = False
    #: exactly which data the problems come from, recorded with the run (``sources/dataset``): e.g.
    #: ``org/name@<commit>`` for a hub dataset; None when there is nothing to pin (generated problems)
    source_tag: Optional[str] = None

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        raise NotImplementedError

    def teacher_keys(self) -> Optional[set[str]]:
        """Every value ``Problem.teacher`` can take in this task (routing to ``model.teachers``), or None when the
        task cannot list them up front (then only the problems drawn are checked). A task that routes nothing
        returns an empty set."""
        return set()

    def verify(self, completion: str, problem: Problem) -> float:
        raise NotImplementedError


def format_template(template: str, values: dict[str, Any], field: str, where: str) -> str:
    """``template.format(**values)``; a missing or malformed placeholder is a ``ConfigError`` naming the field, the
    item (``where``) and the fields it has."""
    try:
        return template.format(**values)
    except KeyError as e:
        raise ConfigError(field, f"{template!r} names {{{e.args[0]}}}, which {where} lacks (it has "
                          f"{', '.join(sorted(map(str, values)))}); double literal braces as {{{{ }}}}") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(field, f"{template!r} is not a valid format string ({e}); name fields as {{field}}, "
                          "double literal braces as {{ }}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_row(row: Any, field: str, where: str, prompt_key: Optional[str], answer_key: str) -> None:
    """A data row must be an object holding a text prompt (``prompt_key``; None when a template builds it) and an
    answer that is not null, else one ``ConfigError`` naming ``field``, the row (``where``: ``file:line`` or
    ``split row i``) and the key, instead of training on ``"None"`` or on ``str()`` of a number or a list."""
    keys = [k for k in (prompt_key, answer_key) if k is not None]
    want = " and ".join(f"'{k}'" for k in keys)
    if not isinstance(row, dict):
        raise ConfigError(field, f"{where}: expected an object with fields {want}, got {type(row).__name__} "
                          f"{_short(row)}")
    for key in keys:
        role = "a prompt" if key == prompt_key else "an answer"
        if key not in row:
            raise ConfigError(field, f"{where}: expected an object with fields {want}; it has no '{key}' (its "
                              f"fields: {', '.join(map(str, row)) or 'none'}), and every row needs {role}")
        if row[key] is None:
            raise ConfigError(field, f"{where}: '{key}' is null; every row needs {role}")
    if prompt_key is not None and not isinstance(row[prompt_key], str):
        raise ConfigError(field, f"{where}: '{prompt_key}' is {type(row[prompt_key]).__name__} "
                          f"{_short(row[prompt_key])}, not text; a prompt must be a string (or build it with "
                          "prompt_template)")


def teacher_value(row: dict, key: str, field: str, where: str) -> str:
    """The routing value of a row (``teacher_field``): the name of the teacher that scores it (a key of
    ``model.teachers``). A missing, null or empty value, or one that is not text or an integer, is one
    ``ConfigError`` naming ``field``, the row (``where``) and the key."""
    need = "with teacher_field every row names the teacher that scores it (a key of model.teachers)"
    if row.get(key) is None:
        raise ConfigError(field, f"{where}: '{key}' is {'null' if key in row else 'missing'}; {need}")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(field, f"{where}: '{key}' is {type(value).__name__} {_short(value)}, not a teacher name; "
                          f"{need}")
    if not str(value).strip():
        raise ConfigError(field, f"{where}: '{key}' is empty; {need}")
    return str(value)


def read_utf8(path: Path, field: str) -> str:
    """The text of a data file; a byte that is not UTF-8 is one ``ConfigError`` naming the file and line (``datasets``
    would fail late, on first access, with a raw traceback)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(field, f"{path}:{line}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); re-encode the file as UTF-8") from None


def json_lines(path: Path, field: str) -> list[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a UTF-8 JSONL file; a malformed line is one
    ``ConfigError`` naming its number (which ``json`` and ``datasets``' reader do not give)."""
    rows = []
    for lineno, line in enumerate(read_utf8(path, field).splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(field, f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def extract_answer(completion: str, pattern: Optional[str]) -> str:
    """The last match of ``pattern``'s first group (or whole match) in ``completion``; the stripped text if None."""
    if pattern is None:
        return completion.strip()
    matches = list(re.finditer(pattern, completion, flags=re.DOTALL))
    if not matches:
        return ""
    m = matches[-1]
    return (m.group(1) if m.groups() else m.group(0)).strip()


class ReasoningGymTask(Task):
    """A ``reasoning-gym`` dataset.

    Args:
        dataset: registered dataset name, e.g. ``chain_sum`` or ``knights_knaves``.
        config: keyword arguments of the dataset's config (e.g. ``{min_terms: 2, max_terms: 5}``).
        seeds: dataset seed per split; items use ``Random(seed + idx)``, so keep them far apart.
        sizes: dataset size per split (train cycles through its items).
        prompt_template: format string over the item (``{question}`` and any metadata key).
        answer_pattern: regex whose last match (group 1) is the answer; None passes the whole completion.
        exact_match: score 1.0 only for an exact string match with the reference answer (``score_answer`` gives
            partial credit on some datasets).
        difficulty_keys: metadata keys that form the difficulty bucket; default: the keys of the item's
            ``metadata.difficulty``.
        privileged_template: format string for the privileged context (self-distillation), e.g.
            ``"{question}\\nReference answer: {answer}"``.
        solution_template: format string for the reference response (dataset prefixes), e.g. ``"#{answer}"``.
        teacher_by_dataset: route each problem to the teacher named after the reasoning-gym dataset it came from
            (``Problem.teacher``, a key of ``model.teachers``): for ``composite`` the sub-dataset of the item
            (its ``metadata.source_dataset``), otherwise ``dataset`` itself.

    Several datasets: ``dataset: composite`` with ``config: {datasets: [{name: chain_sum, weight: 1, config: {...}},
    {name: basic_arithmetic}]}`` (``weight`` defaults to 1 and ``config`` to ``{}``; a bare name is a spec too).
    """

    prefetch_safe = True  # problems() is a pure function of its arguments

    def __init__(self, dataset: str, config: Optional[dict[str, Any]] = None,
                 seeds: Optional[dict[str, int]] = None, sizes: Optional[dict[str, int]] = None,
                 prompt_template: str = "{question}", answer_pattern: Optional[str] = None,
                 exact_match: bool = False, difficulty_keys: Optional[list[str]] = None,
                 privileged_template: Optional[str] = None, solution_template: Optional[str] = None,
                 teacher_by_dataset: bool = False):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            close = [n for n in sorted(DATASETS) if dataset.split("_")[0] in n][:5]
            raise ConfigError(f"{self.field}.dataset", f"unknown reasoning-gym dataset '{dataset}' (expected a "
                              f"registered name{', e.g. ' + ', '.join(close) if close else ''})")
        self.name = dataset
        self.config = dict(config or {})
        self.seeds = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000, **(seeds or {})}
        self.sizes = {"train": 100_000, "val": 512, "test": 512, **(sizes or {})}
        self.prompt_template, self.answer_pattern = prompt_template, answer_pattern
        self.exact_match, self.difficulty_keys = exact_match, difficulty_keys
        self.privileged_template, self.solution_template = privileged_template, solution_template
        self.teacher_by_dataset = bool(teacher_by_dataset)
        if dataset == "composite":
            self.config["datasets"] = self._specs(self.config.get("datasets"))
        self._datasets: dict[str, Any] = {}
        try:
            self._dataset("val")
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"{self.field}.config", f"invalid config for '{dataset}': {e}") from None
        self._rg = reasoning_gym
        version = getattr(reasoning_gym, "__version__", None)  # the generator's code is the data
        self.source_tag = f"reasoning_gym/{dataset}" + (f"@{version}" if version else "")
        self.problems("val", 1)  # a template naming a missing field fails here, not at the first rollout

    def _specs(self, specs: Any) -> list:
        """``composite`` sub-datasets as reasoning-gym ``DatasetSpec`` (from YAML: dicts or bare names)."""
        from reasoning_gym.composite import DatasetSpec

        field = f"{self.field}.config.datasets"
        if not isinstance(specs, (list, tuple)) or not specs:
            raise ConfigError(field, f"composite needs a list of datasets ({{name, weight, config}} each), got "
                              f"{_short(specs)}")
        out = []
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                spec = {"name": spec}
            if isinstance(spec, dict):
                unknown = sorted(set(spec) - {"name", "weight", "config"})
                if "name" not in spec or unknown:
                    raise ConfigError(f"{field}[{i}]", f"expected keys name (required), weight, config; got "
                                      f"{', '.join(map(str, spec)) or 'none'}")
                spec = DatasetSpec(name=spec["name"], weight=spec.get("weight", 1.0),
                                   config=dict(spec.get("config") or {}))
            if not isinstance(spec, DatasetSpec):
                raise ConfigError(f"{field}[{i}]", f"expected a dataset name or {{name, weight, config}}, got "
                                  f"{_short(spec)}")
            out.append(spec)
        return out

    def teacher_keys(self) -> Optional[set[str]]:
        """With ``teacher_by_dataset``: the dataset names (the sub-datasets of ``composite``); else none."""
        if not self.teacher_by_dataset:
            return set()
        if self.name == "composite":
            return {spec.name for spec in self.config["datasets"]}
        return {self.name}

    def _teacher(self, meta: dict, where: str) -> Optional[str]:
        if not self.teacher_by_dataset:
            return None
        if self.name != "composite":
            return self.name
        source = meta.get("source_dataset")
        if source not in self.teacher_keys():
            raise ConfigError(f"{self.field}.teacher_by_dataset", f"{where}: its metadata names no sub-dataset "
                              f"(source_dataset: {_short(source)}); cannot route it to a teacher")
        return str(source)

    def _dataset(self, split: Split):
        if split not in self._datasets:
            import reasoning_gym

            self._datasets[split] = reasoning_gym.create_dataset(self.name, seed=self.seeds[split],
                                                                 size=self.sizes[split], **self.config)
        return self._datasets[split]

    def _difficulty(self, meta: dict) -> Optional[str]:
        keys = self.difficulty_keys or list((meta.get("difficulty") or {}).keys())
        if not keys:
            return None
        diff = meta.get("difficulty") or {}
        return ",".join(f"{k}={meta.get(k, diff.get(k))}" for k in keys)

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        ds = self._dataset(split)
        n = len(ds)
        out = []
        for i in range(offset, offset + count):
            entry = ds[i % n]
            fmt = {**entry["metadata"], "question": entry["question"], "answer": entry["answer"]}
            where = f"{split} item {i % n}"
            def fill(name, fmt=fmt, where=where):
                value = getattr(self, name)
                return format_template(value, fmt, f"{self.field}.{name}", where) if value is not None else None
            out.append(Problem(prompt=fill("prompt_template"), answer=str(entry["answer"]),
                               difficulty=self._difficulty(entry["metadata"]),
                               privileged=fill("privileged_template"), solution=fill("solution_template"),
                               metadata={"entry": entry}, teacher=self._teacher(entry["metadata"], where)))
        return out

    def verify(self, completion: str, problem: Problem) -> float:
        answer = extract_answer(completion, self.answer_pattern)
        if self.exact_match:
            return float(answer == problem.answer)
        ds = self._dataset("val")
        return float(ds.score_answer(answer=answer, entry=problem.metadata["entry"]))


class JSONLTask(Task):
    """Problems from JSONL files, answers verified with ``math-verify``.

    Args:
        train_path / val_path / test_path: JSONL files (val/test optional: they fall back to the train file).
        prompt_field / answer_field / difficulty_field / privileged_field / solution_field: keys of each JSON
            object (the solution is the reference response used by dataset-prefix objectives such as SFT).
        prompt_template: format string over the object's fields, e.g. ``"{problem} Put the answer in \\\\boxed{{}}."``
        answer_pattern: optional regex applied before ``math-verify`` parses the completion.
        teacher_field: key whose value routes each row to a teacher (``Problem.teacher``, a key of
            ``model.teachers``); every row must hold a non-empty value. None: the default teacher.
    """

    prefetch_safe = True  # problems() is a pure function of its arguments

    def __init__(self, train_path: str, val_path: Optional[str] = None, test_path: Optional[str] = None,
                 prompt_field: str = "prompt", answer_field: str = "answer", difficulty_field: Optional[str] = None,
                 privileged_field: Optional[str] = None, solution_field: Optional[str] = None,
                 prompt_template: Optional[str] = None,
                 answer_pattern: Optional[str] = None, shuffle_seed: Optional[int] = 0,
                 teacher_field: Optional[str] = None):
        self.fields = (prompt_field, answer_field, difficulty_field, privileged_field, solution_field)
        self.teacher_field = teacher_field
        self.prompt_template, self.answer_pattern = prompt_template, answer_pattern
        self.data = {"train": self._load(train_path, "train_path")}
        self.data["val"] = self._load(val_path, "val_path") if val_path else self.data["train"]
        self.data["test"] = self._load(test_path, "test_path") if test_path else self.data["val"]
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.data["train"])
        self._teacher_keys = {p.teacher for rows in self.data.values() for p in rows if p.teacher is not None}

    def teacher_keys(self) -> Optional[set[str]]:
        """The distinct ``teacher_field`` values over the train / val / test files (empty without one)."""
        return set(self._teacher_keys)

    def _load(self, path: str, name: str) -> list[Problem]:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{self.field}.{name}", f"no such file '{path}'")
        prompt_f, answer_f, diff_f, priv_f, sol_f = self.fields
        out = []
        rows = json_lines(p, f"{self.field}.{name}")
        teacher_f = self.teacher_field
        if teacher_f is not None and rows and not any(isinstance(r, dict) and teacher_f in r for _, r in rows):
            seen = dict.fromkeys(k for _, r in rows if isinstance(r, dict) for k in r)
            raise ConfigError(f"{self.field}.teacher_field", f"no field '{teacher_f}' in any row of {path} (fields: "
                              f"{', '.join(map(str, seen)) or 'none'})")
        for lineno, row in rows:
            check_row(row, f"{self.field}.{name}", f"{path}:{lineno}",
                      prompt_f if self.prompt_template is None else None, answer_f)
            teacher = (teacher_value(row, teacher_f, f"{self.field}.{name}", f"{path}:{lineno}")
                       if teacher_f is not None else None)
            prompt = (format_template(self.prompt_template, row, f"{self.field}.prompt_template", f"{path}:{lineno}")
                      if self.prompt_template else str(row[prompt_f]))
            out.append(Problem(prompt=prompt, answer=str(row[answer_f]),
                               difficulty=str(row[diff_f]) if diff_f and diff_f in row else None,
                               privileged=str(row[priv_f]) if priv_f and priv_f in row else None,
                               solution=str(row[sol_f]) if sol_f and sol_f in row else None,
                               metadata={"row": row}, teacher=teacher))
        if not out:
            raise ConfigError(f"{self.field}.{name}", f"{path} holds no problems")
        return out

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        data = self.data[split]
        return [data[i % len(data)] for i in range(offset, offset + count)]

    def verify(self, completion: str, problem: Problem) -> float:
        from math_verify import parse, verify

        text = extract_answer(completion, self.answer_pattern) if self.answer_pattern else completion
        gold = parse(problem.answer if "$" in problem.answer or "\\" in problem.answer else f"${problem.answer}$")
        try:
            return float(verify(gold, parse(text)))
        except Exception:  # math-verify raises on pathological inputs: an unparseable answer is wrong
            return 0.0


class CharFrequencyTask(Task):
    """Random prompts over ``alphabet``; the reward is the fraction of ``target`` characters in the response.

    A randomly initialised tiny model starts near ``1/vocab`` and can climb this quickly: a smoke test for RL.
    Each problem also carries a privileged prompt (``"<target>:" + prompt``, for self-distillation) and a reference
    solution (``target`` repeated ``solution_length`` times, for supervised objectives).
    """

    prefetch_safe = True  # problems() is a pure function of its arguments

    def __init__(self, target: str = "a", alphabet: str = "0123456789", prompt_length: int = 4,
                 solution_length: int = 8):
        if len(target) != 1:
            raise ConfigError(f"{self.field}.target", f"expected one character, got '{target}'")
        if not alphabet:
            raise ConfigError(f"{self.field}.alphabet", "expected at least one character to draw prompts from")
        check_int(f"{self.field}.prompt_length", prompt_length)
        check_int(f"{self.field}.solution_length", solution_length)
        self.target, self.alphabet, self.prompt_length = target, alphabet, prompt_length
        self.solution_length = solution_length

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        base = {"train": 0, "val": 10**9, "test": 2 * 10**9}[split]
        out = []
        for i in range(offset, offset + count):
            rng = random.Random(base + i)
            prompt = "".join(rng.choice(self.alphabet) for _ in range(self.prompt_length))
            out.append(Problem(prompt=prompt, answer=self.target, privileged=f"{self.target}:{prompt}",
                               solution=self.target * self.solution_length))
        return out

    def verify(self, completion: str, problem: Problem) -> float:
        return completion.count(self.target) / len(completion) if completion else 0.0
