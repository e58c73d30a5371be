"""A data row without a prompt or an answer, or with a prompt that is not text, is refused when the task is built
(before any compute) with one line naming the file, the row and the field, by ``JSONLTask`` and ``DatasetTask``
alike, instead of being trained on as ``"None"`` or ``str(42)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONFIGS, run_cli
from rlad_pl.core.errors import ConfigError
from rlad_pl.data import DatasetTask, JSONLTask

GOOD = {"prompt": "1+1=", "answer": "2"}

#: (id, the bad row (placed second, on line 3 after a blank first line), expected message after the row's place)
CASES = [
    ("null_answer", {"prompt": "2+2=", "answer": None}, "'answer' is null"),
    ("missing_answer", {"prompt": "2+2="}, "'answer'"),
    ("null_prompt", {"prompt": None, "answer": "4"}, "'prompt' is null"),
    ("missing_prompt", {"question": "2+2=", "answer": "4"}, "'prompt'"),
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # line 1 is blank
    return path


@pytest.mark.parametrize("bad, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_jsonl_task_names_the_line_and_the_field(tmp_path, bad, expected):
    f = _jsonl(tmp_path / "rows.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ConfigError) as e:
        JSONLTask(str(f))
    assert e.value.field == "data.task.train_path"
    assert e.value.message.startswith(f"{f}:3: ") and expected in e.value.message, e.value.message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dataset_task_names_the_line_row_and_field(tmp_path, bad, expected):
    f = _jsonl(tmp_path / "rows.jsonl", [GOOD, bad, GOOD, GOOD])
    with pytest.raises(ConfigError) as e:
        DatasetTask(str(f), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    assert e.value.field == "data.task.path"
    assert e.value.message.startswith(f"{f}:3 (split 'train' row 1): ") and expected in e.value.message, \
        e.value.message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt, shown", [(7, "int"), (["2+2="], "list"), ({"text": "2+2="}, "")],
                         ids=["number", "list", "object"])
def test_a_prompt_that_is_not_text_is_refused(tmp_path, prompt, shown):
    rows = [{"prompt": prompt, "answer": str(i)} for i in range(4)]
    f = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError, match=rf"^data\.task\.train_path: {f}:2: 'prompt' is {shown}.*not text"):
        JSONLTask(str(f))
    with pytest.raises(ConfigError, match=rf"^data\.task\.path: {f}:2 \(split 'train' row 0\): 'prompt' is "
                                          rf".*{shown}.*not text"):
        DatasetTask(str(f), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))


def test_parquet_rows_and_named_evaluation_splits_are_checked_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 4), train)
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, {"prompt": "3+3=", "answer": None}]), test)
    with pytest.raises(ConfigError) as e:
        DatasetTask("parquet", data_files={"train": str(train), "test": str(test)}, val_split="test",
                    cache_dir=str(tmp_path / "cache"))
    assert str(e.value) == ("data.task.path: 'parquet' split 'test' row 2: 'answer' is null (or missing); every "
                            "row needs an answer")


def test_a_prompt_template_needs_no_prompt_column_but_its_fields_must_be_set(tmp_path):
    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    f = _jsonl(tmp_path / "rows.jsonl", rows)
    assert JSONLTask(str(f), prompt_template="Q: {question}", shuffle_seed=None).problems("train", 1)[0].prompt \
        == "Q: 0+1="
    assert DatasetTask(str(f), prompt_template="Q: {question}", val_fraction=0.25, shuffle=False,
                       cache_dir=str(tmp_path / "cache")).problems("train", 1)[0].prompt == "Q: 0+1="
    g = _jsonl(tmp_path / "null_field.jsonl", rows[:1] + [{"question": None, "answer": "2"}] + rows[2:])
    with pytest.raises(ConfigError, match=r"null_field\.jsonl:3 \(split 'train' row 1\): 'question' is null"):
        DatasetTask(str(g), prompt_template="Q: {question}", val_fraction=0.25, cache_dir=str(tmp_path / "cache"))


def test_the_cli_refuses_the_row_in_one_line_before_training(tmp_path, capsys):
    f = _jsonl(tmp_path / "rows.jsonl", [GOOD, {"prompt": "2+2=", "answer": None}, GOOD, GOOD])
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "1",
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--export.enabled", "false",
                "--data.task", "rlad_pl.data.DatasetTask", "--data.task.path", str(f),
                "--data.task.val_fraction", "0.25", "--data.task.cache_dir", str(tmp_path / "cache"))
    assert exc.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlad_pl: error:")]
    assert errors == [f"rlad_pl: error: data.task.path: {f}:3 (split 'train' row 1): 'answer' is null (or "
                      "missing); every row needs an answer"]
