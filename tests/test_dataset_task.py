"""``DatasetTask`` on real files that the tests write (parquet, jsonl, csv, tsv, save_to_disk, a hub-id cache),
held-out splits stratified by difficulty, ``math-verify`` on GSM8K and MATH answers, custom verifiers, and the
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, run_cli, scalars
from rlad_pl.core.errors import ConfigError
from rlad_pl.data import DatasetTask, MathVerifier, Problem
from rlad_pl.data.dataset_task import interleave, largest_remainder

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 1,200 pens a day. How many in 2 days?",
     "answer": "1,200 * 2 = <<1200*2=2400>>2,400\n#### 2,400"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "We get $\\boxed{\\frac{3}{4}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Expand $(x+1)^2 - 2x$.", "solution": "It is $\\boxed{x^2+1}$.", "level": "Level 2",
     "type": "Algebra"},
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sorted_levels(levels=(1, 2, 3, 4, 5), per_level=20) -> list[dict]:
    """Rows sorted by difficulty, as MATH-by-level exports are: the first rows are all Level 1."""
    return [{"problem": f"p{lv}_{i}", "answer": str(100 * lv + i), "level": f"Level {lv}"}
            for lv in levels for i in range(per_level)]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


# ----------------------------------------------------------------------------------------------- formats
def test_gsm8k_parquet_verifies_the_hash_answer(tmp_path, cache):
    f = write_parquet(tmp_path / "gsm8k_train.parquet", GSM8K_ROWS * 5)
    task = DatasetTask(str(f), prompt_field="question", val_fraction=0.2, shuffle=False, cache_dir=cache,
                       prompt_template="{question} Put the final answer after ####.")
    p = task.problems("train", 1)[0]
    assert p.prompt == GSM8K_ROWS[0]["question"] + " Put the final answer after ####." and p.difficulty is None
    assert p.answer == GSM8K_ROWS[0]["answer"] and p.metadata["row"]["question"] == GSM8K_ROWS[0]["question"]
    assert task.verify("3 + 4 = 7 apples.\n#### 7", p) == 1.0
    assert task.verify("#### 8", p) == 0.0
    assert task.verify("the answer is \\boxed{7}", p) == 1.0
    assert task.verify("I do not know", p) == 0.0
    pens = next(q for q in task.problems("train", 10) if "pens" in q.prompt)
    assert task.verify("so 2400 pens\n#### 2400", pens) == 1.0  # reference "2,400": commas dropped
    assert task.verify("#### 2,400", pens) == 1.0 and task.verify("#### 240", pens) == 0.0


def test_math_jsonl_boxed_answers_levels_and_templates(tmp_path, cache):
    f = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS * 4)
    task = DatasetTask(str(f), prompt_field="problem", answer_field="solution", difficulty_field="level",
                       privileged_template="{problem} Reference: {solution}", solution_field="solution",
                       val_fraction=0.25, cache_dir=cache)
    train, val = task.problems("train", 6), task.problems("val", 2)
    assert {p.difficulty for p in val} == {"Level 1", "Level 2"}  # one held-out row per level
    half = next(p for p in train if "frac" in p.prompt)
    assert half.privileged == MATH_ROWS[0]["problem"] + " Reference: " + MATH_ROWS[0]["solution"]
    assert half.solution == MATH_ROWS[0]["solution"]
    assert task.verify("Adding, we get \\boxed{0.75}.", half) == 1.0  # math-verify: 3/4 == 0.75
    assert task.verify("$\\boxed{\\dfrac{3}{4}}$", half) == 1.0
    assert task.verify("\\boxed{\\frac{2}{3}}", half) == 0.0
    poly = next(p for p in train if "Expand" in p.prompt)
    assert task.verify("\\boxed{1 + x^2}", poly) == 1.0 and task.verify("\\boxed{x^2+2x+1}", poly) == 0.0


def test_csv_tsv_and_save_to_disk(tmp_path, cache):
    import datasets

    (tmp_path / "a.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n3+3=,6\n", encoding="utf-8")
    (tmp_path / "a.tsv").write_text("prompt\tanswer\n1+1=\t2\n2+2=\t4\n3+3=\t6\n", encoding="utf-8")
    for name in ("a.csv", "a.tsv"):
        task = DatasetTask(str(tmp_path / name), val_fraction=1 / 3, shuffle=False, cache_dir=cache)
        train, val = task.problems("train", 2), task.problems("val", 1)
        assert sorted((p.prompt, p.answer) for p in train + val) == [("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6")]
        assert task.rows("train") == sorted(task.rows("train")), name  # shuffle: false keeps file order
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    task = DatasetTask(str(tmp_path / "saved"), val_fraction=0.5, seed=3)
    assert sorted(int(p.answer) for p in task.problems("train", 3) + task.problems("val", 3)) == [1, 2, 3, 4, 5, 6]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                                   "test": datasets.Dataset.from_list(rows[4:])})
    splits.save_to_disk(str(tmp_path / "saved_dict"))
    task = DatasetTask(str(tmp_path / "saved_dict"), val_split="test", test_split="test")
    assert sorted(p.prompt for p in task.problems("val", 2)) == ["4+1=", "5+1="]
    assert len(task.rows("train")) == 4 and task.rows("test") == task.rows("val")
    with pytest.raises(ConfigError, match=r"^data\.task\.val_split: no split 'validation' in '.*saved_dict' "
                                          r"\(splits: train, test\)"):
        DatasetTask(str(tmp_path / "saved_dict"), val_split="validation")


def test_builder_with_data_files_per_split(tmp_path, cache):
    write_parquet(tmp_path / "train.parquet", GSM8K_ROWS)
    write_parquet(tmp_path / "test.parquet", GSM8K_ROWS[:1])
    task = DatasetTask("parquet", data_files={"train": str(tmp_path / "train.parquet"),
                                              "test": str(tmp_path / "test.parquet")},
                       prompt_field="question", val_split="test", cache_dir=cache)
    assert len(task.rows("train")) == 2 and [p.answer for p in task.problems("val", 1)] == [GSM8K_ROWS[0]["answer"]]
    with pytest.raises(ConfigError, match=r"^data\.task\.val_split: no split 'validation' in 'parquet' "
                                          r"\(splits: train\)$"):
        DatasetTask("parquet", data_files={"train": str(tmp_path / "train.parquet")}, prompt_field="question",
                    val_split="validation", cache_dir=cache)


# ----------------------------------------------------------------------------------------------- splits
def test_sorted_file_validates_on_every_level(tmp_path, cache):
    f = write_jsonl(tmp_path / "sorted.jsonl", sorted_levels())
    task = DatasetTask(str(f), prompt_field="problem", difficulty_field="level", val_fraction=0.2, cache_dir=cache)
    val, train = task.rows("val"), task.rows("train")
    assert len(val) == 20 and len(train) == 80 and not set(val) & set(train)
    assert sorted(val + train) == list(range(100))
    levels = [p.difficulty for p in task.problems("val", 20)]
    assert Counter(levels) == {f"Level {lv}": 4 for lv in range(1, 6)}  # 20% of each level
    assert sorted(levels[:5]) == [f"Level {lv}" for lv in range(1, 6)]  # every prefix is stratified
    assert Counter(levels[:10]) == {f"Level {lv}": 2 for lv in range(1, 6)}
    # seeded: the same seed holds out the same rows, another seed others
    again = DatasetTask(str(f), prompt_field="problem", difficulty_field="level", val_fraction=0.2, cache_dir=cache)
    other = DatasetTask(str(f), prompt_field="problem", difficulty_field="level", val_fraction=0.2, seed=1,
                        cache_dir=cache)
    assert again.rows("val") == val and sorted(other.rows("val")) != sorted(val)
    # without a difficulty field the held-out rows are a seeded random sample, not the first rows of the file
    plain = DatasetTask(str(f), prompt_field="problem", val_fraction=0.2, cache_dir=cache)
    assert len({p.difficulty for p in plain.problems("val", 20)} - {None}) == 0
    assert len({task.problems("val", 20)[0].metadata["row"]["level"]} | {
        plain.problems("val", 20)[i].metadata["row"]["level"] for i in range(20)}) > 1


def test_unequal_levels_held_out_in_proportion_with_a_test_fraction(tmp_path, cache):
    rows = sorted_levels(levels=(1,), per_level=30) + sorted_levels(levels=(2,), per_level=10) + \
        sorted_levels(levels=(3,), per_level=20)
    f = write_parquet(tmp_path / "uneven.parquet", rows)
    task = DatasetTask(str(f), prompt_field="problem", difficulty_field="level", val_fraction=0.1,
                       test_fraction=0.2, cache_dir=cache)
    val = Counter(p.difficulty for p in task.problems("val", 6))
    test = Counter(p.difficulty for p in task.problems("test", 12))
    assert val == {"Level 1": 3, "Level 2": 1, "Level 3": 2} and test == {"Level 1": 6, "Level 2": 2, "Level 3": 4}
    v, t, tr = set(task.rows("val")), set(task.rows("test")), set(task.rows("train"))
    assert len(tr) == 42 and not (v & t or v & tr or t & tr)


def test_named_test_split_is_ordered_by_round_robin(tmp_path, cache):
    write_jsonl(tmp_path / "train.jsonl", sorted_levels(per_level=4))
    write_jsonl(tmp_path / "test.jsonl", sorted_levels(levels=(1, 2, 3), per_level=10))
    task = DatasetTask("json", data_files={"train": str(tmp_path / "train.jsonl"),
                                           "test": str(tmp_path / "test.jsonl")},
                       prompt_field="problem", difficulty_field="level", val_split="test", cache_dir=cache)
    assert len(task.rows("train")) == 20  # a named validation split holds nothing out of train
    first = [p.difficulty for p in task.problems("val", 6)]
    assert Counter(first) == {"Level 1": 2, "Level 2": 2, "Level 3": 2}


def test_largest_remainder_and_interleave():
    assert largest_remainder(6, [30, 10, 20]) == [3, 1, 2]
    assert largest_remainder(5, [1, 1, 1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1, 0, 0]
    assert sum(largest_remainder(7, [3, 3, 3])) == 7
    assert interleave([[0, 1, 2, 3], [10, 11]]) == [0, 10, 1, 2, 11, 3]


# ----------------------------------------------------------------------------------------------- verifiers
def test_math_verifier_on_gsm8k_and_math_references():
    v = MathVerifier()
    gsm = Problem(prompt="q", answer="Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n"
                                     "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18")
    assert [v(c, gsm) for c in ("#### 18", "She makes $18.\n#### 18", "#### 18.0", "#### 17",
                                 "\\boxed{18}", "")] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    math = Problem(prompt="q", answer="So the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$.")
    assert [v(c, math) for c in ("\\boxed{\\frac{\\sqrt3}{2}}", "\\boxed{\\sqrt{3}/2}", "\\boxed{\\frac{1}{2}}")] \
        == [1.0, 1.0, 0.0]
    plain = Problem(prompt="q", answer="3/4")
    assert v("\\boxed{0.75}", plain) == 1.0 and v("the answer is 3/4", plain) == 1.0
    tagged = MathVerifier(answer_pattern=r"Answer:\s*(\S+)")
    assert tagged("Answer: 0.75 (not 5)", plain) == 1.0 and tagged("0.75", plain) == 0.0


class EndsWith:
    """A custom verifier: 0.5 when the completion ends with the row's ``suffix`` column."""

    def __init__(self, score: float = 0.5):
        self.score = score

    def __call__(self, completion: str, problem: Problem) -> float:
        return self.score if completion.endswith(problem.metadata["row"]["suffix"]) else 0.0


def test_custom_verifier_sees_the_row(tmp_path, cache):
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "answer": "1", "suffix": "zz"}] * 4)
    task = DatasetTask(str(f), verifier=EndsWith(0.25), val_fraction=0.25, cache_dir=cache)
    p = task.problems("train", 1)[0]
    assert task.verify("xzz", p) == 0.25 and task.verify("xz", p) == 0.0


def test_dataset_config_prints(capsys, monkeypatch):
    """configs/grpo_tiny_dataset.yaml parses, and --print_config shows the task and prompt-format settings."""
    import yaml

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny_dataset.yaml"), "--print_config")
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    task, fmt = cfg["data"]["task"], cfg["data"]["prompt_format"]
    assert task["class_path"] == "rlad_pl.data.DatasetTask"
    assert {k: task["init_args"][k] for k in ("path", "prompt_field", "difficulty_field", "val_fraction")} == {
        "path": "configs/data/tiny_sums.jsonl", "prompt_field": "question", "difficulty_field": "level",
        "val_fraction": 0.25}
    assert fmt["mode"] == "chat" and fmt["system_prompt"] == "add the numbers."
    assert fmt["chat_template_kwargs"] == {"enable_thinking": False} and fmt["chat_template"].startswith("{% for m")
    # the shipped file: 60 rows sorted by level, 20 per level; 25% held out = 5 per level
    from rlad_pl.data import DatasetTask as T

    t = T(**{k: v for k, v in task["init_args"].items() if v is not None})
    assert Counter(p.difficulty for p in t.problems("val", 15)) == {"terms=2": 5, "terms=3": 5, "terms=4": 5}
    assert len(t.rows("train")) == 45


@pytest.mark.slow
def test_config_runs_with_a_custom_verifier_by_class_path(tmp_path, monkeypatch):
    """configs/grpo_tiny_dataset.yaml end to end, the verifier named by class_path: every reward is its score."""
    monkeypatch.chdir(REPO)
    verifier = '{"class_path": "test_dataset_task.EndsWith", "init_args": {"score": 0.75}}'
    f = write_jsonl(tmp_path / "s.jsonl", [{"question": f"{i}+1=", "answer": "1", "level": f"l{i % 2}",
                                            "suffix": ""} for i in range(8)])
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny_dataset.yaml"), "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(tmp_path / "run"), "--export.enabled", "false",
                  "--data.task.init_args.path", str(f), "--data.task.init_args.verifier", verifier,
                  "--data.task.init_args.cache_dir", str(tmp_path / "cache"))
    assert isinstance(cli.datamodule.task.verifier, EndsWith) and cli.datamodule.task.verifier.score == 0.75
    assert scalars(Path(cli.trainer.log_dir), "rollout/reward_mean") == [0.75]  # "" ends every completion


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_columns_and_template_fields_list_the_columns(tmp_path, cache):
    f = write_parquet(tmp_path / "m.parquet", MATH_ROWS)
    cols = r"\(columns: problem, solution, level, type\)"
    with pytest.raises(ConfigError, match=r"^data\.task\.prompt_field: no column 'prompt' in '.*m\.parquet' " + cols):
        DatasetTask(str(f), cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.difficulty_field: no column 'Level' in .*" + cols):
        DatasetTask(str(f), prompt_field="problem", answer_field="solution", difficulty_field="Level",
                    cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.prompt_template: no field 'question' in .*" + cols):
        DatasetTask(str(f), prompt_template="{question}?", answer_field="solution", cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.prompt_template: not a valid format string"):
        DatasetTask(str(f), prompt_template="{problem", answer_field="solution", cache_dir=cache)


def test_unreadable_files_are_named(tmp_path, cache):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"^data\.task\.path: .*latin1\.jsonl:2: not valid UTF-8 text \(byte 0xe9"):
        DatasetTask(str(bad), cache_dir=cache)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt,answer\ncaf\xe9,1\n")
    with pytest.raises(ConfigError, match=r"^data\.task\.path: .*latin1\.csv:2: not valid UTF-8"):
        DatasetTask(str(csv), cache_dir=cache)
    import pyarrow as pa
    import pyarrow.parquet as pq

    latin1 = pa.array([b"caf\xe9", b"ok"], type=pa.binary()).view(pa.string())  # as some exporters write
    pq.write_table(pa.table({"prompt": latin1, "answer": pa.array(["1", "2"])}), tmp_path / "latin1.parquet")
    with pytest.raises(ConfigError, match=r"^data\.task\.path: '.*latin1\.parquet' split 'train' column 'prompt' "
                                          r"holds invalid data \(ArrowInvalid: .*Invalid UTF8"):
        DatasetTask(str(tmp_path / "latin1.parquet"), val_fraction=0.5, cache_dir=cache)
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "1", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"^data\.task\.path: cannot read '.*fake\.parquet' \(ArrowInvalid: "):
        DatasetTask(str(fake), cache_dir=cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1", "answer": "1"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^data\.task\.path: .*broken\.jsonl:2: malformed JSON \(Expecting value\)$"):
        DatasetTask(str(broken), cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.path: no such file or folder '.*nope\.parquet'$"):
        DatasetTask(str(tmp_path / "nope.parquet"), cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.data_files: no such file '.*nope\.jsonl'$"):
        DatasetTask("json", data_files={"train": str(tmp_path / "nope.jsonl")}, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.path: '.*notes\.md': unknown file type '\.md'"):
        (tmp_path / "notes.md").write_text("x")
        DatasetTask(str(tmp_path / "notes.md"), cache_dir=cache)


def test_empty_splits_and_bad_fractions(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    for name in ("empty.parquet", "empty.jsonl"):
        with pytest.raises(ConfigError, match=rf"^data\.task\.path: '.*{name}' holds no rows$"):
            DatasetTask(str(tmp_path / name), cache_dir=cache)
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1"}] * 3)
    with pytest.raises(ConfigError, match=r"^data\.task\.data_files: '.*empty\.parquet' holds no rows$"):
        DatasetTask("json", data_files={"train": str(train), "test": str(tmp_path / "empty.parquet")},
                    val_split="test", cache_dir=cache)
    f = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    with pytest.raises(ConfigError, match=r"^data\.task\.val_fraction: holding out 2 of 2 rows of split 'train' "
                                          r"leaves no training rows"):
        DatasetTask(str(f), val_fraction=0.9, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.val_fraction: expected a fraction in \[0, 1\), got 1\.5"):
        DatasetTask(str(f), val_fraction=1.5, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.val_fraction: set either val_split \('test'\) or "
                                          r"val_fraction"):
        DatasetTask(str(f), val_split="test", val_fraction=0.1, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.test_split: 'train' is the training split \(evaluation "
                                          r"rows would be trained on\); name another split or hold rows out with "
                                          r"test_fraction$"):
        DatasetTask(str(f), test_split="train", cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.val_fraction: validation needs rows"):
        DatasetTask(str(f), val_fraction=0.0, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"^data\.task\.split: no split 'dev' in '.*two\.jsonl' \(splits: train\)$"):
        DatasetTask(str(f), split="dev", cache_dir=cache)


# ----------------------------------------------------------------------------------------------- hub ids, offline
def write_hub_cache(cache: Path, repo: str, config: str, rows: list[dict], tmp: Path) -> None:
    """What an online ``load_dataset(repo, config)`` leaves in the datasets cache (``org___name/config/...``),
    produced by preparing the rows locally and renaming them into the hub dataset's place."""
    import glob
    import shutil

    import datasets

    write_parquet(tmp / "rows.parquet", rows)
    datasets.load_dataset("parquet", data_files={"train": str(tmp / "rows.parquet")}, cache_dir=str(tmp / "prep"))
    src = next(Path(p) for p in glob.glob(str(tmp / "prep" / "parquet" / "*" / "0.0.0" / "*")) if Path(p).is_dir())
    org, name = repo.split("/")
    dst = cache / f"{org}___{name}" / config / "0.0.0" / src.name
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name)
    (dst / "dataset_info.json").write_text(json.dumps(info))
    (dst / "parquet-train.arrow").rename(dst / f"{name}-train.arrow")


def test_hub_id_offline_from_the_cache_and_missing(tmp_path):
    """In a fresh process with ``HF_HUB_OFFLINE=1``: a cached hub dataset loads by id; an uncached one is one line."""
    cache = tmp_path / "datasets"
    write_hub_cache(cache, "someorg/tiny-gsm8k", "main", GSM8K_ROWS * 2, tmp_path)
    code = (
        "import sys\n"
        "from rlad_pl.data import DatasetTask\n"
        "from rlad_pl.core.errors import ConfigError\n"
        f"t = DatasetTask('someorg/tiny-gsm8k', name='main', prompt_field='question', val_fraction=0.25, "
        f"cache_dir={str(cache)!r})\n"
        "p = t.problems('val', 1)[0]\n"
        "print('loaded', len(t.rows('train')), t.verify('#### ' + p.answer.split('#### ')[1], p))\n"
        "try:\n"
        f"    DatasetTask('someorg/not-cached', cache_dir={str(cache)!r})\n"
        "except ConfigError as e:\n"
        "    print('error', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "loaded 3 1.0"
    assert lines[1] == ("error data.task.path: 'someorg/not-cached' is not a local file or folder and not in the "
                        "datasets cache, and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it "
                        "once online or point path at local files")


def test_math_answers_are_checked_the_same_in_a_worker_thread():
    """Asynchronous rollouts score in a worker thread, where math-verify's signal-based timeout cannot be set: the
    verifier must still tell right from wrong there (it used to score everything 0)."""
    from concurrent.futures import ThreadPoolExecutor

    from rlad_pl.data.verifiers import math_equal

    cases = [("3/4", "0.75", True), ("9", "9", True), ("1,000", "1000", True), ("7", "8", False)]
    main = [math_equal(a, b) for a, b, _ in cases]
    with ThreadPoolExecutor(1) as pool:
        threaded = list(pool.map(lambda c: math_equal(c[0], c[1]), cases))
    assert main == threaded == [want for _, _, want in cases]
