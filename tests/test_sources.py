"""A run records exactly which snapshots it trained on: the resolved hub commit of the student, teacher, tokenizer
and dataset (``sources``) in its ``hparams.yaml``, in every checkpoint's ``hyper_parameters`` and under
``sources/*`` in TensorBoard's HPARAMS tab. Hub caches are written by the tests (``huggingface_hub`` layout for the
models, ``datasets`` layout for the dataset) and read offline."""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, run_cli
from test_hub_models import COMMIT_A, COMMIT_B, hub, write_snapshot  # noqa: F401  (hub: a fixture)

COMMIT_D = hashlib.sha1(b"dataset snapshot").hexdigest()
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]


def write_hub_dataset(cache: Path, repo: str, config: str, commit: str, rows: list[dict], tmp: Path) -> Path:
    """What an online ``load_dataset(repo, config)`` of ``commit`` leaves in the datasets cache:
    ``<cache>/org___name/<config>/0.0.0/<commit>/`` (the rows prepared locally, then moved into place)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp / "rows.parquet")
    datasets.load_dataset("parquet", data_files={"train": str(tmp / "rows.parquet")}, cache_dir=str(tmp / "prep"))
    src = next(Path(p) for p in glob.glob(str(tmp / "prep" / "parquet" / "*" / "0.0.0" / "*")) if Path(p).is_dir())
    org, name = repo.split("/")
    dst = cache / f"{org}___{name}" / config / "0.0.0" / commit
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name)
    (dst / "dataset_info.json").write_text(json.dumps(info))
    (dst / "parquet-train.arrow").rename(dst / f"{name}-train.arrow")
    return dst


@pytest.fixture
def offline_datasets(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_dataset_task_records_the_commit_of_a_hub_dataset(tmp_path, offline_datasets):
    from rlad_pl.data import DatasetTask

    cache = tmp_path / "datasets"
    write_hub_dataset(cache, "someorg/tiny-sums", "main", COMMIT_D, ROWS, tmp_path)
    task = DatasetTask("someorg/tiny-sums", name="main", val_fraction=0.25, cache_dir=str(cache))
    assert task.source_tag == f"someorg/tiny-sums@{COMMIT_D}"
    assert len(task.rows("train")) == 7
    local = tmp_path / "rows.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert DatasetTask(str(local), val_fraction=0.25, cache_dir=str(cache)).source_tag == str(local)


def test_generated_tasks_record_their_generator(tmp_path):
    import reasoning_gym

    from rlad_pl.data import ChainSumTask, CharFrequencyTask, ReasoningGymTask

    assert CharFrequencyTask().source_tag is None
    assert ReasoningGymTask("chain_sum").source_tag == f"reasoning_gym/chain_sum@{reasoning_gym.__version__}"
    assert ChainSumTask().source_tag == f"reasoning_gym/chain_sum@{reasoning_gym.__version__}"


def _tb_hparams(log_dir: Path) -> dict[str, str]:
    """The HPARAMS tab's hyperparameters (``session_start_info``) from the event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out: dict[str, str] = {}
    for f in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        ea = EventAccumulator(f, size_guidance={"tensors": 0})
        ea.Reload()
        content = ea.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        if content is not None:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            out.update({k: v.string_value for k, v in data.session_start_info.hparams.items()})
    return out


def test_a_fit_records_the_commits_of_models_tokenizer_and_dataset(hub, tmp_path, offline_datasets):  # noqa: F811
    """TRRD with the student at ``org/tiny`` (main = COMMIT_A), the teacher at ``org/tiny@v2`` (COMMIT_B) and a hub
    dataset at COMMIT_D, offline: the commits land in hparams.yaml, last.ckpt and the HPARAMS tab."""
    cache = tmp_path / "datasets"
    write_hub_dataset(cache, "someorg/tiny-sums", "main", COMMIT_D, ROWS, tmp_path)
    root = tmp_path / "runs"
    cli = run_cli("fit", "--config", str(CONFIGS / "trrd_tiny.yaml"), "--model.student", "org/tiny",
                  "--model.teacher", "org/tiny@v2", "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                  str(root), "--trainer.check_val_every_n_epoch", "1", "--export.enabled", "false",
                  "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                  "--data.task", "rlad_pl.data.DatasetTask", "--data.task.path", "someorg/tiny-sums",
                  "--data.task.name", "main", "--data.task.val_fraction", "0.25", "--data.task.cache_dir", str(cache),
                  "--data.val_prompts", "2", "--data.prompts_per_rollout", "2", "--data.group_size", "2")
    expected = {"student": f"org/tiny@{COMMIT_A}", "tokenizer": f"org/tiny@{COMMIT_A}",
                "teacher": f"org/tiny@{COMMIT_B}", "teacher_tokenizer": f"org/tiny@{COMMIT_B}",
                "dataset": f"someorg/tiny-sums@{COMMIT_D}"}
    log_dir = Path(cli.trainer.log_dir)
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["sources"] == expected
    assert hparams["student"] == "org/tiny"  # the module's own arguments stay as given
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["sources"] == expected
    assert "sources" not in cli.model.hparams  # the module's hyperparameters are not changed
    tb = _tb_hparams(log_dir)
    assert {k: tb.get(f"sources/{k}") for k in expected} == expected, tb
