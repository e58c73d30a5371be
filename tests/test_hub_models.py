"""Models by hub id: a Hugging Face cache that the test writes itself (``models--org--tiny/{refs,blobs,snapshots}``,
the ``huggingface_hub`` layout: snapshot files are relative symlinks to content-addressed blobs), read offline.

Snapshot ``COMMIT_A`` (``refs/main``) is ``rlad_pl/assets/tiny-student`` byte for byte; ``COMMIT_B`` (also
``refs/v2``) has every weight shifted by +0.5, so a test can tell which snapshot was loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli
from rlad_pl.core.errors import ConfigError
from rlad_pl.models.loading import PACKAGE_DIR, load_causal_lm, load_tokenizer, resolve_source

TINY = PACKAGE_DIR / "assets" / "tiny-student"
GRPO_TINY = str(CONFIGS / "grpo_tiny.yaml")
COMMIT_A = hashlib.sha1(b"snapshot a").hexdigest()
COMMIT_B = hashlib.sha1(b"snapshot b").hexdigest()
SENTINEL = "hf_SENTINELtokenDoNotLog0123456789"


def write_snapshot(cache: Path, repo_id: str, commit: str, src: Path, refs: tuple[str, ...] = ()) -> Path:
    """Lay out the files of folder ``src`` as ``commit`` of ``repo_id`` in hub cache ``cache``: blobs named by
    their sha256, snapshot entries as relative symlinks ``../../blobs/<sha>``, ``refs/<name>`` holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", sha))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def shifted_copy(out: Path) -> Path:
    """``tiny-student`` with every parameter + 0.5 (same config and tokenizer)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(TINY, out)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache with ``org/tiny`` at ``COMMIT_A`` (main) and ``COMMIT_B`` (v2); returns the cache."""
    cache = tmp_path / "hf_home" / "hub"
    write_snapshot(cache, "org/tiny", COMMIT_A, TINY, refs=("main",))
    write_snapshot(cache, "org/tiny", COMMIT_B, shifted_copy(tmp_path / "shifted"), refs=("v2",))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _cli_error(capsys, *args: str) -> str:
    """Run ``fit`` on grpo_tiny with ``args``; assert exit code 2 and one error line on stderr; return it."""
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", GRPO_TINY, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false", "--export.enabled", "false", *args)
    assert exc.value.code == 2
    # Lightning's own "Seed set to 0" line comes before the model is built; everything else is the one error line
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not re.fullmatch(
        r"(INFO: )?Seed set to \d+", ln)]
    assert len(err) == 1 and err[0].startswith("rlad_pl: error: "), err
    return err[0]


def test_hub_id_loads_the_same_files_as_the_folder(hub):
    src = resolve_source("org/tiny", "model.student")
    assert (src.repo_id, src.commit, src.offline) == ("org/tiny", COMMIT_A, True)
    assert src.folder == hub / "models--org--tiny" / "snapshots" / COMMIT_A and src.tag == f"org/tiny@{COMMIT_A}"
    by_id, by_folder = _state(load_causal_lm("org/tiny", "model.student")), _state(load_causal_lm(TINY, "m"))
    assert by_id.keys() == by_folder.keys() and all(torch.equal(by_id[k], by_folder[k]) for k in by_id)
    assert load_tokenizer("org/tiny").get_vocab() == load_tokenizer(TINY).get_vocab()


@pytest.mark.parametrize("spec, revision", [(f"org/tiny@{COMMIT_B}", None), ("org/tiny", COMMIT_B),
                                            ("org/tiny@v2", None), ("org/tiny", "v2")])
def test_revision_picks_its_snapshot(hub, spec, revision):
    base = _state(load_causal_lm(TINY, "m"))
    src = resolve_source(spec, "model.student", revision=revision)
    assert src.commit == COMMIT_B
    state = _state(load_causal_lm(src, "model.student"))
    assert all(torch.allclose(state[k], base[k] + 0.5) for k in base)


def test_module_revision_args_and_default_tokenizer_from_the_same_snapshot(hub):
    from rlad_pl.objectives import GRPO
    from rlad_pl.training.module import DistillationModule

    m = DistillationModule("org/tiny", [GRPO()], student_revision="v2")
    assert m.model_tags["student"] == f"org/tiny@{COMMIT_B}"
    expected = _state(load_causal_lm(f"org/tiny@{COMMIT_B}", "s"))
    assert all(torch.equal(m.student.state_dict()[k], expected[k]) for k in expected)
    assert m.hparams.student_revision == "v2" and m.hparams.trust_remote_code is False


@pytest.mark.parametrize("tokenizer, student_rev, tokenizer_rev, commits", [
    (None, None, None, (COMMIT_A, COMMIT_A)), (None, "v2", None, (COMMIT_B, COMMIT_B)),
    ("org/tiny", "v2", None, (COMMIT_B, COMMIT_B)), (None, None, "v2", (COMMIT_A, COMMIT_B)),
    ("org/tiny@v2", None, None, (COMMIT_A, COMMIT_B))])
def test_tokenizer_snapshot(hub, tokenizer, student_rev, tokenizer_rev, commits):
    from rlad_pl.models.loading import resolve_model_and_tokenizer

    m, t = resolve_model_and_tokenizer("org/tiny", "model.student", tokenizer, "model.tokenizer", student_rev,
                                       tokenizer_rev)
    assert (m.commit, t.commit) == commits and (m.kind, t.kind) == ("model", "tokenizer")


def test_revision_errors(hub, tmp_path):
    with pytest.raises(ConfigError, match=r"^model.student_revision: revision 'v3' of 'org/tiny' is not in the "
                                          r"local cache .* \(cached: main, v2, .*\) and offline \(HF_HUB_OFFLINE=1\)$"):
        resolve_source("org/tiny", "model.student", revision="v3")
    with pytest.raises(ConfigError, match=r"^model.student_revision: 'v2' conflicts with the revision in "
                                          r"model.student 'org/tiny@main'$"):
        resolve_source("org/tiny@main", "model.student", revision="v2")
    with pytest.raises(ConfigError, match=r"^model.student_revision: 'v2' given, but model.student .* is a local "
                                          r"folder; a revision applies to hub ids only$"):
        resolve_source(str(TINY), "model.student", revision="v2")


def test_missing_id_offline_is_one_line_from_the_cli(hub, capsys):
    line = _cli_error(capsys, "--model.student", "org/missing", "--model.tokenizer", "org/missing")
    assert line.startswith("rlad_pl: error: model.student: 'org/missing' is not in the local cache "
                           f"{hub} and offline (HF_HUB_OFFLINE=1)"), line


def test_missing_local_folder(hub, capsys):
    line = _cli_error(capsys, "--model.student", "./no/such/folder")
    assert line.startswith("rlad_pl: error: model.student: no such local folder './no/such/folder' (looked in "), line
    with pytest.raises(ConfigError, match=r"^model.student: '.*model.safetensors' is a file; expected a model "
                                          "folder"):
        resolve_source(TINY / "model.safetensors", "model.student")


def test_folder_without_config_json(hub, tmp_path, capsys):
    folder = tmp_path / "tokenizer_only"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, folder / name)
    line = _cli_error(capsys, "--model.student", str(folder))
    assert line == (f"rlad_pl: error: model.student: model.student '{folder}' has no config.json (a model folder "
                    "is written by save_pretrained: config.json + weights); it holds ['tokenizer.json', "
                    "'tokenizer_config.json']")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(hub, tmp_path, capsys, how):
    folder = tmp_path / "broken"
    shutil.copytree(TINY, folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    else:
        weights.write_bytes(b"\x00" * 64)
    # the teacher is broken: its file is named (all names are checked before any model loads)
    line = _cli_error(capsys, "--config", str(CONFIGS / "opd_tiny.yaml"), "--model.teacher", str(folder),
                      "--model.teacher_tokenizer", str(TINY))
    assert line.startswith(f"rlad_pl: error: model.teacher: weights file {weights} is corrupt or truncated "
                           "(Error while deserializing header: "), line


def test_corrupt_snapshot_blob_is_named(hub):
    weights = hub / "models--org--tiny" / "snapshots" / COMMIT_A / "model.safetensors"
    blob = weights.resolve()
    os.truncate(blob, 1000)
    with pytest.raises(ConfigError, match=f"^model.student: weights file {weights} is corrupt or truncated"):
        resolve_source("org/tiny", "model.student")


def test_config_json_not_json_names_the_file(hub, tmp_path):
    folder = tmp_path / "badjson"
    shutil.copytree(TINY, folder)
    (folder / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ConfigError, match=f"^model.student: {folder / 'config.json'} is not valid JSON "):
        resolve_source(folder, "model.student")


def test_remote_code_off_unless_asked(hub, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(TINY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "tiny_custom",
                                                    "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"}}))
    with pytest.raises(ConfigError, match="needs its own Python code .* set model.trust_remote_code: true"):
        resolve_source(folder, "model.student")
    trusted = resolve_source(folder, "model.student", trust_remote_code=True)
    assert trusted.from_pretrained_args() == (str(folder), {"trust_remote_code": True})
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_arch"}))
    with pytest.raises(ConfigError, match="has model_type 'no_such_arch', which transformers .* does not know$"):
        resolve_source(folder, "model.student", trust_remote_code=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ConfigError, match=r"config.json has no model_type \(not a transformers model config\?\)$"):
        resolve_source(folder, "model.student")


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_warning_is_one_line(hub, capsys, trust):
    from rlad_pl.objectives import GRPO
    from rlad_pl.training.module import DistillationModule

    m = DistillationModule("org/tiny", [GRPO()], trust_remote_code=trust)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "rlad_pl: warning: model.trust_remote_code" in ln]
    expected = [f"rlad_pl: warning: model.trust_remote_code: on, so Python code from 'org/tiny@{COMMIT_A}' may run "
                "on this machine"] if trust else []
    assert err == expected and m.hparams.trust_remote_code is trust


def test_tiny_fit_by_hub_id_keeps_the_token_out_of_the_run(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    root = tmp_path / "run"
    cli = run_cli("fit", "--config", GRPO_TINY, "--model.student", "org/tiny", "--model.tokenizer", "org/tiny",
                  "--model.student_revision", "v2", "--trainer.max_epochs", "2", "--trainer.default_root_dir",
                  str(root))
    assert cli.trainer.current_epoch == 2
    assert cli.model.model_tags["student"] == f"org/tiny@{COMMIT_B}"
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "config.yaml" in names and "hparams.yaml" in names and any(n.endswith(".ckpt") for n in names)
    assert any(n.startswith("events.out.tfevents") for n in names) and "model.safetensors" in names
    hparams = next(p for p in files if p.name == "hparams.yaml").read_text()
    assert "student: org/tiny" in hparams and "student_revision: v2" in hparams
    leaks = [str(p) for p in files if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []


def test_teacher_cache_is_keyed_by_the_teacher_commit(hub, tmp_path):
    """Teacher generations cached under ``org/tiny`` at main are not reused for ``org/tiny`` at v2."""
    cache = tmp_path / "teacher_cache"
    for rev in ("main", "v2"):
        cli = run_cli("fit", "--config", str(CONFIGS / "forward_kl_teacher_prefix_tiny.yaml"), "--model.teacher",
                      "org/tiny", "--model.teacher_tokenizer", "org/tiny", "--model.teacher_revision", rev,
                      "--data.teacher_cache_dir", str(cache), "--trainer.max_epochs", "1", "--trainer.logger",
                      "false", "--trainer.enable_checkpointing", "false", "--export.enabled", "false")
        assert cli.model.model_tags["teacher"] == f"org/tiny@{COMMIT_A if rev == 'main' else COMMIT_B}"
        assert cli.datamodule.rollout_stats["rollout/teacher_cache_hits"] == 0.0
    assert len(list(cache.glob("*.json"))) == 2


def test_sharded_weights_missing_or_truncated_shard_is_named(hub, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    shutil.copytree(TINY, folder)
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(TINY).save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    ref, state = _state(load_causal_lm(TINY, "m")), _state(load_causal_lm(folder, "model.student"))
    assert all(torch.equal(ref[k], state[k]) for k in ref)
    os.truncate(shards[1], 200)
    with pytest.raises(ConfigError, match=f"^model.student: weights file {shards[1]} is corrupt or truncated"):
        resolve_source(folder, "model.student")
    shards[1].unlink()
    with pytest.raises(ConfigError, match=f"^model.student: weights file {shards[1]} is missing \\(listed in "
                                          "model.safetensors.index.json\\)$"):
        resolve_source(folder, "model.student")


def test_snapshot_without_weights_offline(hub, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(TINY, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    write_snapshot(hub, "org/partial", COMMIT_A, partial, refs=("main",))
    with pytest.raises(ConfigError, match="^model.student: model.student 'org/partial' .* has config.json but no "
                                          r"weights \(model.safetensors"):
        resolve_source("org/partial", "model.student")


def test_file_broken_after_resolution_is_named_when_loading(hub, tmp_path):
    """A weights file that goes bad between the check and the load (e.g. a download) is still named."""
    folder = tmp_path / "late"
    shutil.copytree(TINY, folder)
    src = resolve_source(folder, "model.student")
    os.truncate(folder / "model.safetensors", 500)
    with pytest.raises(ConfigError, match=f"^model.student: weights file {folder / 'model.safetensors'} is corrupt"):
        load_causal_lm(src, "model.student")
