"""``DatasetTask``: problems from anything Hugging Face ``datasets`` loads; answers checked with ``math-verify``.

``datasets`` does the loading (``load_dataset`` / ``load_from_disk``, its cache and offline mode), this class maps
columns to ``Problem`` fields, makes the validation / test splits and picks the verifier:

* ``path``: a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` / ``.tsv`` / ``.arrow`` / ``.txt`` file, a
  ``save_to_disk`` folder, a folder of data files, a builder name with ``data_files`` (``path: parquet,
  data_files: {train: a.parquet, test: b.parquet}``) or a hub id (``openai/gsm8k`` with ``name: main``,
  ``revision``). Hub datasets load the way ``datasets`` does: from its cache when there, downloaded otherwise;
  with ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) only the cache is used.
* Field mapping: ``prompt_field`` or ``prompt_template`` (a format string over the row, ``"{question} Put the
  final answer after ####."``), ``answer_field``, ``difficulty_field``, ``solution_field`` / ``solution_template``
  (reference responses for dataset-prefix objectives such as SFT), ``privileged_field`` /
  ``privileged_template`` (the teacher's privileged prompt for self-distillation, OPSD) and ``teacher_field`` (the
  column naming the teacher that scores each row, a key of ``model.teachers``; verl's ``teacher_key``, TRL's
  ``teacher_id``).
* Splits: training rows come from ``split``; validation from ``val_split`` or, by default, a held-out
  ``val_fraction`` (0.1) of the training split; test from ``test_split``, a held-out ``test_fraction``, or else
  the validation rows. Held-out rows never appear in training. With a ``difficulty_field`` the held-out rows are
  **stratified by difficulty** (each bucket contributes its share, largest remainder rounding) and every
  evaluation split is ordered by proportional round-robin over the buckets, so the first ``val_prompts`` rows the
  data module evaluates cover the buckets in proportion even when the file is sorted by difficulty. Row order is
  shuffled with ``seed`` (``shuffle: false`` keeps file order within a bucket).
* Verifier: ``rlad_pl.data.verifiers.MathVerifier`` (GSM8K ``#### 42`` and ``\\boxed{}`` in completions and
  references, mathematical equality by ``math-verify``), or any callable ``(completion, problem) -> float`` given
  as ``verifier`` (``class_path`` in YAML); it sees the dataset row as ``problem.metadata["row"]``.

Bad input is one ``ConfigError`` line naming the field: unknown column (listing the available ones), missing file,
a file that is not valid UTF-8 or not readable as its format (naming the file), an empty or unknown split, a hub
dataset that is not cached while offline.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

from rlad_pl.core.errors import ConfigError
from rlad_pl.data.tasks import Problem, Split, Task, json_lines, read_utf8
from rlad_pl.data.verifiers import MathVerifier

#: file suffix -> ``datasets`` packaged builder
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
            ".arrow": "arrow", ".txt": "text"}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt"}
DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]


def check_text_file(path: Path, field: str) -> None:
    """A text data file must be UTF-8 (``datasets`` would fail late, on first access, with a raw traceback) and a
    ``.jsonl`` file one JSON value per line (named by line number, which ``datasets``' reader does not give)."""
    if path.suffix.lower() == ".jsonl":
        json_lines(path, field)
    else:
        read_utf8(path, field)


def check_file(path: Path, field: str) -> None:
    """Local data files: readable text (``check_text_file``) and not empty (``datasets`` fails obscurely on both)."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        check_text_file(path, field)
        empty = not path.read_text(encoding="utf-8").strip()
    else:
        empty = path.stat().st_size == 0 or (suffix == ".parquet" and _parquet_rows(path) == 0)
    if empty:
        raise ConfigError(field, f"'{path}' holds no rows")


def template_fields(template: str, field: str) -> list[str]:
    """The row keys a format string reads (``{question}``, ``{meta[level]}`` -> ``meta``)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(field, f"not a valid format string ({e}); write literal braces as {{{{ }}}}") from None
    return [n.split(".")[0].split("[")[0] for n in names if n]


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over buckets in proportion to ``sizes`` (integer counts, largest remainder, each <= size)."""
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    counts = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda b: (-(exact[b] - counts[b]), b))
    for b in order[:total - sum(counts)]:
        counts[b] += 1
    return [min(c, s) for c, s in zip(counts, sizes)]


def interleave(groups: list[list[int]]) -> list[int]:
    """Proportional round-robin: item j of a bucket of size n sits at (j + 0.5) / n, so every prefix of the result
    holds each bucket within one item of its share."""
    keyed = [((j + 0.5) / len(g), b, idx) for b, g in enumerate(groups) for j, idx in enumerate(g)]
    return [idx for _, _, idx in sorted(keyed)]


class DatasetTask(Task):
    """Problems from a Hugging Face ``datasets`` dataset (see the module docstring).

    Args:
        path: local file / folder, builder name (with ``data_files``) or hub id.
        name: the dataset configuration (hub datasets with several, e.g. ``main`` for ``openai/gsm8k``).
        split: training split.
        val_split / test_split: named evaluation splits (e.g. ``test``).
        val_fraction: share of the training split held out for validation when ``val_split`` is not set
            (default 0.1); 0 with no ``val_split`` is an error (validation needs rows).
        test_fraction: share held out for testing when ``test_split`` is not set (default 0: test = validation).
        data_files: ``data_files`` of ``load_dataset`` (a file, a list, or ``{split: files}``).
        revision: hub revision (branch, tag or commit).
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        load_kwargs: further ``load_dataset`` keyword arguments (e.g. ``{sep: ";"}`` for a csv).
        prompt_field / answer_field / difficulty_field / solution_field / privileged_field: column names.
        prompt_template / solution_template / privileged_template: format strings over the row (instead of the
            corresponding field).
        answer_pattern: regex for the default verifier: group 1 of its last match in a completion is the answer.
        verifier: a callable ``(completion, problem) -> float`` replacing ``MathVerifier``.
        seed: seed of the held-out selection and of the row order.
        shuffle: shuffle rows (within difficulty buckets for evaluation splits).
        teacher_field: column whose value (text or integer, never null or empty) routes each row to a teacher
            (``Problem.teacher``, a key of ``model.teachers``). None: every row goes to the default teacher.
    """

    prefetch_safe = True  # problems() is a pure function of its arguments

    def __init__(self, path: str, name: Optional[str] = None, split: str = "train",
                 val_split: Optional[str] = None, test_split: Optional[str] = None,
                 val_fraction: Optional[float] = None, test_fraction: float = 0.0,
                 data_files: Optional[DataFiles] = None, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, load_kwargs: Optional[dict[str, Any]] = None,
                 prompt_field: str = "prompt", answer_field: str = "answer", difficulty_field: Optional[str] = None,
                 solution_field: Optional[str] = None, privileged_field: Optional[str] = None,
                 prompt_template: Optional[str] = None, solution_template: Optional[str] = None,
                 privileged_template: Optional[str] = None, answer_pattern: Optional[str] = None,
                 verifier: Optional[Callable[[str, Problem], float]] = None, seed: int = 0, shuffle: bool = True,
                 teacher_field: Optional[str] = None):
        f = self.field
        if val_split is not None and val_fraction is not None:
            raise ConfigError(f"{f}.val_fraction", f"set either val_split ('{val_split}') or val_fraction, not both")
        if test_split is not None and test_fraction:
            raise ConfigError(f"{f}.test_fraction", f"set either test_split ('{test_split}') or test_fraction")
        for key, name_ in (("val_split", val_split), ("test_split", test_split)):
            if name_ == split:
                raise ConfigError(f"{f}.{key}", f"'{name_}' is the training split (evaluation rows would be trained "
                                  f"on); name another split or hold rows out with {key[:-6]}_fraction")
        val_fraction = 0.1 if val_split is None and val_fraction is None else (val_fraction or 0.0)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{f}.{key}", f"expected a fraction in [0, 1), got {value}")
        if val_split is None and val_fraction == 0.0:
            raise ConfigError(f"{f}.val_fraction", "validation needs rows: set val_split or a val_fraction > 0")
        for a, b in (("solution_field", "solution_template"), ("privileged_field", "privileged_template")):
            if locals()[a] is not None and locals()[b] is not None:
                raise ConfigError(f"{f}.{b}", f"set either {a} or {b}, not both")
        if verifier is not None and answer_pattern is not None:
            raise ConfigError(f"{f}.answer_pattern", "applies to the default math-verify verifier only; configure "
                              "the custom verifier instead")
        self.path, self.name, self.revision, self.seed, self.shuffle = path, name, revision, seed, shuffle
        self.prompt_field, self.answer_field, self.difficulty_field = prompt_field, answer_field, difficulty_field
        self.solution_field, self.privileged_field = solution_field, privileged_field
        self.prompt_template, self.solution_template = prompt_template, solution_template
        self.privileged_template, self.teacher_field = privileged_template, teacher_field
        self.verifier = verifier if verifier is not None else MathVerifier(answer_pattern)
        self._load_args = dict(data_files=data_files, revision=revision, cache_dir=cache_dir, **(load_kwargs or {}))

        train = self._split(split, "split")
        self.source_tag = self._source_tag(train)
        rng = random.Random(seed)
        labels = self._labels(train)
        n = len(labels)
        n_val = 0 if val_split is not None else max(1, round(val_fraction * n))
        n_test = 0 if test_split is not None or not test_fraction else max(1, round(test_fraction * n))
        if n_val + n_test >= n:
            raise ConfigError(f"{f}.val_fraction" if n_val else f"{f}.test_fraction",
                              f"holding out {n_val + n_test} of {n} rows of split '{split}' leaves no training rows")
        buckets = self._buckets(labels, rng)  # shuffled: the held-out rows are a seeded sample of each bucket
        val_counts = largest_remainder(n_val, [len(b) for b in buckets])
        rest = [b[c:] for b, c in zip(buckets, val_counts)]
        test_counts = largest_remainder(n_test, [len(b) for b in rest])
        self.splits: dict[str, tuple[Any, list[int]]] = {}
        train_rows = [i for b, c in zip(rest, test_counts) for i in b[c:]]
        if shuffle:
            rng.shuffle(train_rows)
        else:
            train_rows.sort()
        self.splits["train"] = (train, train_rows)
        if val_split is not None:
            self.splits["val"] = self._eval_split(val_split, "val_split", rng)
        else:
            self.splits["val"] = (train, interleave([self._order(b[:c]) for b, c in zip(buckets, val_counts)]))
        if test_split is not None:
            self.splits["test"] = self._eval_split(test_split, "test_split", rng)
        elif n_test:
            self.splits["test"] = (train, interleave([self._order(b[:c]) for b, c in zip(rest, test_counts)]))
        else:
            self.splits["test"] = self.splits["val"]
        self._cache: dict[tuple[str, int], Problem] = {}
        self._teacher_keys = self._distinct_teachers()

    def _distinct_teachers(self) -> set[str]:
        """The distinct ``teacher_field`` values over the datasets the splits serve (every row of each is served:
        the training split's rows are trained on or held out), read from the Arrow columns."""
        import pyarrow.compute as pc

        if self.teacher_field is None:
            return set()
        keys: set[str] = set()
        for ds in {id(ds): ds for ds, _ in self.splits.values()}.values():
            if getattr(ds, "_indices", None) is not None:
                ds = ds.flatten_indices()
            keys.update(str(v) for v in pc.unique(ds.data.table.column(self.teacher_field)).to_pylist())
        return keys

    def teacher_keys(self) -> Optional[set[str]]:
        """The distinct values of ``teacher_field`` over every split (empty without one)."""
        return set(self._teacher_keys)

    # ----------------------------------------------------------------------------------------- loading
    def _load(self, split: str, key: str):
        """One split as a ``datasets.Dataset``: local file / folder / builder + data_files / hub id."""
        import datasets

        f, p = self.field, Path(self.path).expanduser()
        args = {k: v for k, v in self._load_args.items() if v is not None}
        self._check_data_files(args.get("data_files"))
        if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            return self._from_disk(p, split, key)  # a save_to_disk folder (Dataset or DatasetDict)
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ConfigError(f"{f}.path", f"'{self.path}': unknown file type '{p.suffix}' (expected one of "
                                  f"{', '.join(sorted(BUILDERS))}, a folder or a hub id)")
            check_file(p, f"{f}.path")
            if p.suffix.lower() == ".tsv":
                args.setdefault("sep", "\t")
            args["data_files"] = {"train": str(p)}
            return self._call(datasets.load_dataset, builder, split, key, args)
        if p.suffix.lower() in BUILDERS or self.path.startswith((".", "/", "~")):
            raise ConfigError(f"{f}.path", f"no such file or folder '{self.path}'")
        return self._call(datasets.load_dataset, self.path, split, key, {"name": self.name, **args})

    def _source_tag(self, ds) -> str:
        """``org/name@<commit>`` for a hub dataset: the commit ``datasets`` resolved (online) or found in its cache
        (offline), which names the dataset's cache folder (``<cache>/org___name/<config>/<version>/<commit>``). Local
        files, folders and builders keep their path (``@revision`` when one was asked for and no commit is known)."""
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        if Path(self.path).expanduser().exists() or self.path in _PACKAGED_DATASETS_MODULES:
            return self.path
        files = [f.get("filename") for f in (getattr(ds, "cache_files", None) or []) if f.get("filename")]
        commit = Path(files[0]).parent.name if files else ""
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return f"{self.path}@{commit}"
        return self.path + (f"@{self.revision}" if self.revision else "")

    def _check_data_files(self, data_files: Optional[DataFiles]) -> None:
        if data_files is None:
            return
        groups = data_files.values() if isinstance(data_files, dict) else [data_files]
        for g in groups:
            for file in [g] if isinstance(g, str) else g:
                fp = Path(file).expanduser()
                if "*" in file or "://" in file or not (fp.suffix.lower() in BUILDERS or fp.is_absolute()):
                    continue  # globs, URLs and files inside a hub repo are resolved by ``datasets``
                if not fp.is_file():
                    raise ConfigError(f"{self.field}.data_files", f"no such file '{file}'")
                check_file(fp, f"{self.field}.data_files")

    def _from_disk(self, p: Path, split: str, key: str):
        import datasets

        try:
            obj = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ConfigError(f"{self.field}.path", f"cannot read the saved dataset '{p}' ({_reason(e)})") from None
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise ConfigError(f"{self.field}.{key}", f"no split '{split}' in '{self.path}' (splits: "
                                  f"{', '.join(obj)})")
            return obj[split]
        if split != "train":
            raise ConfigError(f"{self.field}.{key}", f"'{self.path}' holds one dataset without splits; only "
                              f"'train' (got '{split}')")
        return obj

    def _call(self, load, source: str, split: str, key: str, args: dict):
        import datasets

        f = self.field
        try:
            return load(source, split=split, **args)
        except ConfigError:
            raise
        except ValueError as e:
            msg = str(e)
            if msg.startswith("Unknown split"):
                known = re.findall(r"'([^']+)'", msg.split("one of", 1)[-1])
                raise ConfigError(f"{f}.{key}", f"no split '{split}' in '{self.path}' (splits: {', '.join(known)})"
                                  ) from None
            raise ConfigError(f"{f}.path", f"cannot read '{self.path}' ({_reason(e)})") from None
        except ConnectionError as e:
            if datasets.config.HF_HUB_OFFLINE:
                raise ConfigError(f"{f}.path", f"'{self.path}' is not a local file or folder and not in the "
                                  "datasets cache, and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): "
                                  "load it once online or point path at local files") from None
            raise ConfigError(f"{f}.path", f"cannot reach the Hugging Face Hub for '{self.path}' ({_reason(e)})"
                              ) from None
        except datasets.exceptions.DatasetNotFoundError:
            raise ConfigError(f"{f}.path", f"no local file or folder '{self.path}' and no such dataset on the "
                              "Hugging Face Hub (gated or private? log in with `hf auth login` or set HF_TOKEN)"
                              ) from None
        except FileNotFoundError as e:
            raise ConfigError(f"{f}.path", f"'{self.path}': {_reason(e)}") from None
        except Exception as e:  # unreadable files: pyarrow / json / csv errors, wrapped by datasets
            raise ConfigError(f"{f}.path", f"cannot read '{self.path}' ({_reason(e)})") from None

    def _split(self, split: str, key: str):
        """One split, checked: not empty, every mapped column present, their values valid (UTF-8 strings)."""
        ds = self._load(split, key)
        if len(ds) == 0:
            raise ConfigError(f"{self.field}.{key}", f"split '{split}' of '{self.path}' holds no rows")
        used = self._check_columns(ds)
        for col in used:  # invalid UTF-8 inside parquet / arrow strings would otherwise fail on first access
            try:
                ds.data.table.column(col).validate(full=True)
            except Exception as e:
                raise ConfigError(f"{self.field}.path", f"'{self.path}' split '{split}' column '{col}' holds "
                                  f"invalid data ({_reason(e)}); re-encode it as UTF-8") from None
        self._check_rows(ds, split)
        return ds

    def _check_rows(self, ds, split: str) -> None:
        """Every row has a text prompt and an answer: a null in a column the prompt (field or template) or the
        answer reads, or a prompt column that is not text, is one ``ConfigError`` naming the first such row, checked
        on the Arrow columns when the split is loaded (``_problem`` would otherwise train on ``"None"``)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        table = ds.data.table
        prompt_cols = ([self.prompt_field] if self.prompt_template is None else
                       template_fields(self.prompt_template, f"{self.field}.prompt_template"))
        for col, role in [(c, "prompt") for c in dict.fromkeys(prompt_cols)] + [(self.answer_field, "answer")]:
            column = table.column(col)
            if column.null_count:
                i = pc.index(pc.is_null(column), True).as_py()
                raise ConfigError(f"{self.field}.path", f"{self._row(split, i)}: '{col}' is null (or missing); "
                                  f"every row needs a{'n' if role == 'answer' else ''} {role}")
        if self.prompt_template is None:
            kind = table.column(self.prompt_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                    or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
                value = table.column(self.prompt_field)[0].as_py()
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ConfigError(f"{self.field}.path", f"{self._row(split, 0)}: '{self.prompt_field}' is {kind} "
                                  f"{shown}, not text; a prompt must be a string (or build it with prompt_template)")
        if self.teacher_field is not None:
            self._check_teacher_column(table, split)

    def _check_teacher_column(self, table, split: str) -> None:
        """``teacher_field`` holds a teacher name in every row: text or integers, no null, no empty text."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.teacher_field
        column, kind = table.column(col), table.column(col).type
        need = "with teacher_field every row names the teacher that scores it (a key of model.teachers)"
        if column.null_count:
            i = pc.index(pc.is_null(column), True).as_py()
            raise ConfigError(f"{self.field}.path", f"{self._row(split, i)}: '{col}' is null (or missing); {need}")
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if not (text or pa.types.is_integer(kind)):
            value = column[0].as_py()
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"{self.field}.path", f"{self._row(split, 0)}: '{col}' is {kind} {shown}, not a "
                              f"teacher name (text or an integer); {need}")
        if text:
            blank = pc.equal(pc.utf8_trim_whitespace(column), "")
            if pc.any(blank).as_py():
                i = pc.index(blank, True).as_py()
                raise ConfigError(f"{self.field}.path", f"{self._row(split, i)}: '{col}' is empty; {need}")

    def _row(self, split: str, i: int) -> str:
        """``'<path>' split '<split>' row <i>``, with the line number of a local ``.jsonl`` file."""
        where = f"'{self.path}' split '{split}' row {i}"
        p = Path(self.path).expanduser()
        if p.is_file() and p.suffix.lower() == ".jsonl":
            lines = [n for n, _ in json_lines(p, f"{self.field}.path")]
            if i < len(lines):
                where = f"{p}:{lines[i]} (split '{split}' row {i})"
        return where

    def _check_columns(self, ds) -> list[str]:
        """The columns the field mapping reads (each must exist: else an error listing the available ones)."""
        cols = list(ds.column_names)
        listing = f"(columns: {', '.join(cols)})"
        if self.prompt_template is not None:
            needed = [("prompt_template", t)
                      for t in template_fields(self.prompt_template, f"{self.field}.prompt_template")]
        else:
            needed = [("prompt_field", self.prompt_field)]
        needed.append(("answer_field", self.answer_field))
        for key in ("difficulty_field", "solution_field", "privileged_field", "teacher_field"):
            if getattr(self, key) is not None:
                needed.append((key, getattr(self, key)))
        for key in ("solution_template", "privileged_template"):
            if getattr(self, key) is not None:
                needed += [(key, t) for t in template_fields(getattr(self, key), f"{self.field}.{key}")]
        for key, col in needed:
            if col not in cols:
                what = "field" if key.endswith("template") else "column"
                raise ConfigError(f"{self.field}.{key}", f"no {what} '{col}' in '{self.path}' {listing}")
        return sorted({col for _, col in needed})

    # ----------------------------------------------------------------------------------------- splits
    def _labels(self, ds) -> list[Optional[str]]:
        if self.difficulty_field is None:
            return [None] * len(ds)
        return [None if v is None else str(v) for v in ds[self.difficulty_field]]

    @staticmethod
    def _buckets(labels: list[Optional[str]], rng: random.Random) -> list[list[int]]:
        """Row indices per difficulty bucket (sorted by name, missing last), shuffled with ``rng``."""
        groups: dict[Optional[str], list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        out = [groups[k] for k in sorted(groups, key=lambda k: (k is None, k or ""))]
        for g in out:
            rng.shuffle(g)
        return out

    def _order(self, rows: list[int]) -> list[int]:
        """Rows in serving order: as drawn (shuffled) or, with ``shuffle: false``, in file order."""
        return list(rows) if self.shuffle else sorted(rows)

    def _eval_split(self, split: str, key: str, rng: random.Random) -> tuple[Any, list[int]]:
        ds = self._split(split, key)
        return ds, interleave([self._order(b) for b in self._buckets(self._labels(ds), rng)])

    # ----------------------------------------------------------------------------------------- problems
    def _problem(self, split: str, i: int) -> Problem:
        ds, _ = self.splits[split]
        if (split, i) not in self._cache:
            row = ds[i]
            fmt = lambda t: t.format(**row)  # noqa: E731
            col = lambda c: None if c is None or row.get(c) is None else str(row[c])  # noqa: E731
            self._cache[(split, i)] = Problem(
                prompt=fmt(self.prompt_template) if self.prompt_template is not None else str(row[self.prompt_field]),
                answer=str(row[self.answer_field]), difficulty=col(self.difficulty_field),
                privileged=fmt(self.privileged_template) if self.privileged_template else col(self.privileged_field),
                solution=fmt(self.solution_template) if self.solution_template else col(self.solution_field),
                metadata={"row": row, "index": i}, teacher=col(self.teacher_field))
        return self._cache[(split, i)]

    def rows(self, split: Split) -> list[int]:
        """The dataset row indices of ``split`` in the order ``problems`` serves them."""
        return list(self.splits[split][1])

    def problems(self, split: Split, count: int, offset: int = 0) -> list[Problem]:
        _, rows = self.splits[split]
        return [self._problem(split, rows[i % len(rows)]) for i in range(offset, offset + count)]

    def verify(self, completion: str, problem: Problem) -> float:
        return float(self.verifier(completion, problem))


def _parquet_rows(p: Path) -> int:
    """Row count from a parquet footer; -1 when unreadable (the reader then reports why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(p).metadata.num_rows
    except Exception:
        return -1


def _reason(e: BaseException) -> str:
    """The innermost cause of ``e`` as ``Type: first line`` (``datasets`` wraps reader errors)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}"[:300] if text else type(e).__name__


__all__ = ["DatasetTask", "interleave", "largest_remainder"]
