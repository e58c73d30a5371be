"""``configs/own_model_trrd.yaml`` (the README's "Train your own model"): it parses, and its data section works on
GSM8K-layout parquet files written here (the models are hub ids that this machine cannot download)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import CONFIGS, REPO

CONFIG = CONFIGS / "own_model_trrd.yaml"


def test_own_model_config_prints():
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", str(CONFIG), "--print_config"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for needle in ("student: Qwen/Qwen3-0.6B", "teacher: Qwen/Qwen3-1.7B", "class_path: rlad_pl.data.DatasetTask",
                   "enable_thinking: false", "class_path: rlad_pl.rollout.vllm.VLLMSampler",
                   "class_path: rlad_pl.objectives.TRRD", "system_prompt: You are a careful math tutor"):
        assert needle in out.stdout, needle


def test_own_model_config_data_section(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlad_pl.data import DatasetTask

    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    rows = {s: [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
                for i in range(n)] for s, n in (("train", 100), ("test", 20))}
    for split, r in rows.items():
        pq.write_table(pa.Table.from_pylist(r), tmp_path / "data" / "gsm8k" / f"{split}.parquet")
    monkeypatch.chdir(tmp_path)
    args = yaml.safe_load(CONFIG.read_text())["data"]["task"]["init_args"]
    task = DatasetTask(**args)
    train = task.problems("train", 95)
    val, test = task.problems("val", 5), task.problems("test", 20)
    assert len({p.prompt for p in train}) == 95 and len({p.prompt for p in val}) == 5  # 5% of 100 held out
    assert not {p.prompt for p in val} & {p.prompt for p in train}
    assert sorted(p.prompt for p in test) == sorted(f"What is {i} + {i}?\nReason step by step, then give the final "
                                                    "answer after ####." for i in range(20))
    p = next(q for q in test if q.prompt.startswith("What is 7 + 7?"))
    assert task.verify("7 + 7 = 14\n#### 14", p) == 1.0
    assert task.verify("7 + 7 = 15\n#### 15", p) == 0.0
