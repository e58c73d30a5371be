"""Routing problems to named teachers (issue 24): ``Problem.teacher`` and ``Task.teacher_keys()`` of the tasks.

``JSONLTask`` / ``DatasetTask`` read it from a ``teacher_field`` column (verl's ``teacher_key``, TRL's
``teacher_id``); ``ReasoningGymTask(teacher_by_dataset=True)`` routes each item to the dataset it came from; tasks
without routing give ``teacher=None`` and ``teacher_keys() == set()``. A row without a routing value, or a
``teacher_field`` that is not a column, is one line naming the file / row and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO
from rlad_pl.core.errors import ConfigError
from rlad_pl.data import ChainSumTask, CharFrequencyTask, DatasetTask, JSONLTask, ReasoningGymTask


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # line 1 is blank
    return path


def _rows(teachers: list) -> list[dict]:
    return [{"prompt": f"{i}+1=", "answer": str(i + 1), "who": t} for i, t in enumerate(teachers)]


def _dataset_task(path: Path, tmp_path: Path, **kw) -> DatasetTask:
    return DatasetTask(str(path), val_fraction=0.25, cache_dir=str(tmp_path / "cache"), **kw)


# ------------------------------------------------------------------------------------------------ JSONLTask
def test_jsonl_task_routes_each_row_and_lists_keys_over_every_split(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _rows(["math", "code", "math", 7]))
    val = _jsonl(tmp_path / "val.jsonl", _rows(["science"]))
    task = JSONLTask(str(train), val_path=str(val), teacher_field="who", shuffle_seed=None)
    got = [(p.prompt, p.teacher) for p in task.problems("train", 4)]
    assert got == [("0+1=", "math"), ("1+1=", "code"), ("2+1=", "math"), ("3+1=", "7")]  # an integer is its text
    assert [p.teacher for p in task.problems("val", 1)] == ["science"]
    assert [p.teacher for p in task.problems("test", 1)] == ["science"]  # test falls back to val
    assert task.teacher_keys() == {"math", "code", "7", "science"}
    task.teacher_keys().add("x")  # a copy
    assert "x" not in task.teacher_keys()


def test_jsonl_task_without_teacher_field_routes_nothing(tmp_path):
    task = JSONLTask(str(_jsonl(tmp_path / "t.jsonl", _rows(["math", "code"]))))
    assert {p.teacher for p in task.problems("train", 2)} == {None}
    assert task.teacher_keys() == set()


@pytest.mark.parametrize("bad, expected", [
    (None, "'who' is null"), ("", "'who' is empty"), ("  ", "'who' is empty"), ("drop", "'who' is missing"),
    (True, "'who' is bool True, not a teacher name"), (["a"], "'who' is list ['a'], not a teacher name"),
], ids=["null", "empty", "blank", "missing", "bool", "list"])
def test_jsonl_task_refuses_a_row_without_a_teacher(tmp_path, bad, expected):
    rows = _rows(["math", bad, "code"])
    if bad == "drop":
        del rows[1]["who"]
    f = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        JSONLTask(str(f), teacher_field="who")
    assert e.value.field == "data.task.train_path"
    assert e.value.message.startswith(f"{f}:3: {expected}"), e.value.message
    assert "model.teachers" in e.value.message and "\n" not in str(e.value)
    # the val file is checked the same way, and named
    good = _jsonl(tmp_path / "good.jsonl", _rows(["math"]))
    with pytest.raises(ConfigError, match=r"^data\.task\.val_path: .*rows\.jsonl:3: 'who'"):
        JSONLTask(str(good), val_path=str(f), teacher_field="who")


def test_jsonl_task_unknown_teacher_field_lists_the_fields(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", _rows(["math", "code"]))
    with pytest.raises(ConfigError) as e:
        JSONLTask(str(f), teacher_field="teacher")
    assert str(e.value) == (f"data.task.teacher_field: no field 'teacher' in any row of {f} "
                            "(fields: prompt, answer, who)")


# ------------------------------------------------------------------------------------------------ DatasetTask
def test_dataset_task_routes_each_row_and_lists_keys_over_every_split(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", _rows(["math", "code"] * 4))
    task = _dataset_task(f, tmp_path, teacher_field="who")
    served = task.problems("train", 6) + task.problems("val", 2)
    assert sorted(p.prompt for p in served) == sorted(f"{i}+1=" for i in range(8))  # every row, once
    for p in served:
        assert p.teacher == ("math" if int(p.prompt.split("+")[0]) % 2 == 0 else "code"), p
    assert task.teacher_keys() == {"math", "code"}
    # named splits: a value only the validation split holds is listed too
    train = _jsonl(tmp_path / "train.jsonl", _rows(["x"] * 3))
    val = _jsonl(tmp_path / "val.jsonl", _rows(["science"] * 2))
    named = DatasetTask("json", data_files={"train": str(train), "validation": str(val)}, val_split="validation",
                        teacher_field="who", cache_dir=str(tmp_path / "cache"))
    assert {p.teacher for p in named.problems("train", 3)} == {"x"}
    assert {p.teacher for p in named.problems("val", 2)} == {"science"}
    assert named.teacher_keys() == {"x", "science"}
    # an integer column: each value is its text
    ints = _jsonl(tmp_path / "ints.jsonl", [{**r, "who": i % 2} for i, r in enumerate(_rows(["x"] * 4))])
    task = _dataset_task(ints, tmp_path, teacher_field="who")
    assert task.teacher_keys() == {"0", "1"}
    assert {p.teacher for p in task.problems("train", 3) + task.problems("val", 1)} == {"0", "1"}


def test_dataset_task_without_teacher_field_routes_nothing(tmp_path):
    task = _dataset_task(_jsonl(tmp_path / "rows.jsonl", _rows(["math", "code"] * 2)), tmp_path)
    assert {p.teacher for p in task.problems("train", 3) + task.problems("val", 1)} == {None}
    assert task.teacher_keys() == set()


@pytest.mark.parametrize("bad, expected", [
    (None, "'who' is null (or missing)"), ("drop", "'who' is null (or missing)"), ("", "'who' is empty"),
    (" ", "'who' is empty"),
], ids=["null", "missing", "empty", "blank"])
def test_dataset_task_refuses_a_row_without_a_teacher(tmp_path, bad, expected):
    rows = _rows(["math", bad, "code", "math"])
    if bad == "drop":
        del rows[1]["who"]
    f = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        _dataset_task(f, tmp_path, teacher_field="who")
    assert e.value.field == "data.task.path"
    assert e.value.message.startswith(f"{f}:3 (split 'train' row 1): {expected}; with teacher_field"), \
        e.value.message
    assert "\n" not in str(e.value)


def test_dataset_task_refuses_a_teacher_column_that_is_not_names(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", [{**r, "who": 0.5} for r in _rows(["x"] * 4)])
    with pytest.raises(ConfigError, match=rf"^data\.task\.path: {f}:2 \(split 'train' row 0\): 'who' is double 0\.5,"
                                          r" not a teacher name"):
        _dataset_task(f, tmp_path, teacher_field="who")


def test_dataset_task_unknown_teacher_field_lists_the_columns(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", _rows(["math", "code"] * 2))
    with pytest.raises(ConfigError) as e:
        _dataset_task(f, tmp_path, teacher_field="teacher")
    assert str(e.value) == f"data.task.teacher_field: no column 'teacher' in '{f}' (columns: prompt, answer, who)"


# ------------------------------------------------------------------------------------------------ reasoning-gym
TWO = {"datasets": [{"name": "chain_sum", "weight": 1, "config": {"min_terms": 2, "max_terms": 2}},
                    {"name": "basic_arithmetic"}]}  # weight defaults to 1, config to {}


def test_reasoning_gym_teacher_by_dataset_routes_to_the_source_dataset():
    task = ReasoningGymTask("composite", config=TWO, teacher_by_dataset=True, exact_match=True)
    assert task.teacher_keys() == {"chain_sum", "basic_arithmetic"}
    problems = task.problems("train", 16) + task.problems("val", 8)
    assert {p.teacher for p in problems} == {"chain_sum", "basic_arithmetic"}
    for p in problems:
        assert p.teacher == p.metadata["entry"]["metadata"]["source_dataset"]
    # the composite verifier still scores through the item's own dataset
    p = problems[0]
    assert task.verify(p.answer, p) == 1.0
    # one dataset: its name
    single = ReasoningGymTask("chain_sum", teacher_by_dataset=True)
    assert single.teacher_keys() == {"chain_sum"}
    assert {p.teacher for p in single.problems("train", 4)} == {"chain_sum"}


def test_reasoning_gym_routes_nothing_by_default():
    for task in (ReasoningGymTask("composite", config={"datasets": ["chain_sum", "basic_arithmetic"]}),
                 ReasoningGymTask("chain_sum")):
        assert task.teacher_keys() == set()
        assert {p.teacher for p in task.problems("train", 6)} == {None}


@pytest.mark.parametrize("datasets, field, expected", [
    (None, "config.datasets", "composite needs a list of datasets"),
    ([{"weight": 1}], r"config.datasets\[0\]", "expected keys name"),
    ([{"name": "chain_sum", "wieght": 1}], r"config.datasets\[0\]", "expected keys name"),
    ([3], r"config.datasets\[0\]", "expected a dataset name"),
    (["chain_sum", "no_such_dataset"], "config", "invalid config for 'composite'"),
    (["chain_sum", "chain_sum"], "config", "invalid config for 'composite'.*[Dd]uplicate"),
], ids=["none", "no_name", "unknown_key", "number", "unknown_dataset", "duplicate"])
def test_reasoning_gym_composite_bad_specs(datasets, field, expected):
    with pytest.raises(ConfigError, match=rf"^data\.task\.{field}: {expected}"):
        ReasoningGymTask("composite", config={"datasets": datasets}, teacher_by_dataset=True)


def test_generated_tasks_route_nothing():
    for task in (ChainSumTask(), CharFrequencyTask()):
        assert task.teacher_keys() == set()
        assert {p.teacher for p in task.problems("train", 4)} == {None}


# ------------------------------------------------------------------------------------------------ the config
def test_multi_teacher_tiny_config_data_routes_even_and_odd(monkeypatch):
    """configs/multi_teacher_tiny.yaml: its data.task builds (paths relative to the repository root) and routes
    every row to `even` / `odd` by the parity of its sum, half the rows each, the keys model.teachers names."""
    config = yaml.safe_load((CONFIGS / "multi_teacher_tiny.yaml").read_text())
    spec = config["data"]["task"]
    assert spec["class_path"] == "rlad_pl.data.DatasetTask" and spec["init_args"]["teacher_field"] == "teacher"
    monkeypatch.chdir(REPO)
    task = DatasetTask(**spec["init_args"])
    assert task.teacher_keys() == {"even", "odd"} == set(config["model"]["teachers"])
    served = task.problems("train", len(task.rows("train"))) + task.problems("val", len(task.rows("val")))
    assert len(served) == 40 and len({p.prompt for p in served}) == 40
    for p in served:
        total = int(p.answer.rsplit("#### ", 1)[1])
        assert p.teacher == ("even" if total % 2 == 0 else "odd") and total == eval(p.prompt.rstrip("="))
    assert sum(p.teacher == "even" for p in served) == 20
