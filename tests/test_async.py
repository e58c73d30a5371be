"""Asynchronous rollouts with bounded staleness (``data.max_off_policy_steps``, ``rlad_pl.pipeline.asynchronous``)
and the objectives' off-policy corrections (``rlad_pl.objectives.off_policy``).

Fast: corrections against hand-computed weights, the limiting cases (equal policies and k = 0 give exactly the
synchronous losses), the schedule (batch e is sampled from the weights after step eU - k: regenerating it from those
stored weights gives the same tokens), one-line refusals, a CLI run logging staleness. Slow (real vLLM servers): a
served asynchronous run overlaps generation with training and makes the same batches as ``StaleSampler`` at the same
k; kill -9 mid-run, then ``--ckpt_path last`` resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONFIGS, assert_same_scalars, run_cli, scalars
from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import GRPO, KDRL, TRRD, Denominators, ForwardKL, OPDSampled
from rlad_pl.objectives.base import StudentOutputs
from rlad_pl.objectives.off_policy import OffPolicy, off_policy_weights


# ------------------------------------------------------------------------------------------------ corrections
def test_each_correction_against_hand_computed_weights():
    prox = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]])
    behaviour = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = torch.exp(prox - behaviour)  # [[e, 1, e^-2], [1, e^2.5, 1]]
    assert off_policy_weights(OffPolicy("none"), prox, behaviour, mask).weights is None
    torch.testing.assert_close(off_policy_weights(OffPolicy("ratio"), prox, behaviour, mask).weights, r)
    tis = off_policy_weights(OffPolicy("tis", cap=2.0), prox, behaviour, mask)
    torch.testing.assert_close(tis.weights, r.clamp_max(2.0))
    # the cap binds on (0, 0) (e > 2) and (1, 1) (e^2.5 > 2) among 5 valid tokens
    assert tis.metrics["off_policy_truncated_frac"].item() == pytest.approx(2 / 5)
    ice = off_policy_weights(OffPolicy("icepop", low=0.5, high=5.0), prox, behaviour, mask)
    want = torch.tensor([[math.e, 1.0, 0.0], [1.0, 0.0, 1.0]])  # e^-2 < 0.5 and e^2.5 > 5 are masked
    torch.testing.assert_close(ice.weights, want)
    assert ice.metrics["off_policy_masked_frac"].item() == pytest.approx(2 / 5)
    seq = off_policy_weights(OffPolicy("seq_mask", low=0.5, high=2.0), prox, behaviour, mask)
    # geometric-mean ratios over valid tokens: exp((1 + 0 - 2) / 3) = 0.72 (kept), exp((0 + 2.5) / 2) = 3.5 (dropped)
    torch.testing.assert_close(seq.weights, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert seq.metrics["off_policy_log_ratio_abs"].item() == pytest.approx((1 + 0 + 2 + 0 + 2.5) / 5)


def _batch(n=4, r=5, seed=0, sampler_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, r, generator=g) * 2
    mask = torch.ones(n, r)
    mask[0, 3:] = 0
    batch = RolloutBatch(input_ids=torch.zeros(n, r + 1, dtype=torch.long), attention_mask=torch.ones(n, r + 1),
                         prompt_len=1, response_mask=mask, rewards=torch.tensor([1.0, 0.0, 1.0, 0.0])[:n],
                         advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:n], group_ids=torch.zeros(n).long(),
                         teacher_logprobs=-torch.rand(n, r, generator=g) * 2,
                         sampler_logprobs=(logp + sampler_shift * torch.randn(n, r, generator=g)).clamp(max=0.0))
    return batch, logp


def _loss(obj, batch, logp):
    obj.loss_agg = obj.loss_agg or "token_mean"
    lp = logp.clone().requires_grad_(True)
    out = obj.compute(batch, StudentOutputs(logprobs=lp), Denominators.of(batch.response_mask))
    out.loss.backward()
    return out.loss.detach(), lp.grad


@pytest.mark.parametrize("make", [lambda **k: GRPO(**k), lambda **k: KDRL(kd_coef=0.1, **k),
                                  lambda **k: TRRD(**k), lambda **k: OPDSampled(**k)])
@pytest.mark.parametrize("kind", ["ratio", "tis", "icepop", "seq_mask"])
def test_equal_policies_give_exactly_the_synchronous_loss(make, kind):
    """Behaviour = trainer policy: every correction leaves loss and gradient exactly as without one."""
    batch, logp = _batch()
    plain, corrected = make(), make(off_policy=kind)
    plain.resolve_off_policy(False)
    corrected.resolve_off_policy(True)
    (a, ga), (b, gb) = _loss(plain, batch, logp), _loss(corrected, batch, logp)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_auto_is_the_declared_correction_only_when_asynchronous():
    grpo, fkl, opd = GRPO(), ForwardKL(), OPDSampled()
    assert grpo.resolve_off_policy(False).kind == "none"  # k = 0: the synchronous loss, untouched
    assert grpo.resolve_off_policy(True).kind == "tis"
    assert opd.resolve_off_policy(True).kind == "tis"
    assert fkl.resolve_off_policy(True).kind == "none"
    assert GRPO(off_policy="icepop").resolve_off_policy(False).kind == "icepop"  # named: applies when synchronous
    assert GRPO(tis_cap=2.0).resolve_off_policy(True).kind == "none"  # its own TIS weight already corrects


def test_stale_samples_are_reweighted_by_tis():
    """GRPO with one update per batch: ratio 1 (old = current), ``w = min(exp(l - l_b), cap)``, token mean of
    ``-w A``; the gradient is ``-w A / N_tok`` per token."""
    batch, logp = _batch(sampler_shift=0.7)
    obj = GRPO(off_policy={"kind": "tis", "cap": 1.5})
    obj.resolve_off_policy(True)
    loss, grad = _loss(obj, batch, logp)
    w = torch.exp(logp - batch.sampler_logprobs).clamp_max(1.5)
    m = batch.response_mask
    adv = batch.advantages.unsqueeze(-1)
    torch.testing.assert_close(loss, (-(w * adv) * m).sum() / m.sum())
    torch.testing.assert_close(grad, -(w * adv) * m / m.sum())


def test_the_ratio_correction_clips_grpo_against_the_behaviour_policy():
    batch, logp = _batch(sampler_shift=0.7)
    obj = GRPO(off_policy="ratio", eps_low=0.2, eps_high=0.2)
    obj.resolve_off_policy(True)
    loss, _ = _loss(obj, batch, logp)
    r = torch.exp(logp - batch.sampler_logprobs)
    adv = batch.advantages.unsqueeze(-1)
    surr = torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    m = batch.response_mask
    torch.testing.assert_close(loss, (-surr * m).sum() / m.sum())


@pytest.mark.parametrize("make, field, match", [
    (lambda: GRPO(off_policy="pop"), "grpo.off_policy", "expected auto, none, ratio, tis, icepop, seq_mask"),
    (lambda: GRPO(off_policy={"kind": "tis", "cap": 0}), "grpo.off_policy.cap", "positive cap"),
    (lambda: GRPO(off_policy={"kind": "icepop", "low": 3, "high": 2}), "grpo.off_policy.low", "low < high"),
    (lambda: GRPO(off_policy={"kind": "tis", "cpa": 2}), "grpo.off_policy.cpa", "kind, cap, low, high"),
])
def test_bad_corrections_are_one_line(make, field, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert e.value.field == field


def test_corrections_a_loss_cannot_use_are_one_line():
    with pytest.raises(ConfigError, match="ForwardKL takes none, seq_mask, got 'tis'"):
        ForwardKL(off_policy="tis").resolve_off_policy(True)
    with pytest.raises(ConfigError, match="never go stale"):
        ForwardKL(prefix_source="teacher", off_policy="seq_mask").resolve_off_policy(True)
    with pytest.raises(ConfigError, match="either tis_cap or off_policy") as e:
        GRPO(tis_cap=2.0, off_policy="tis").resolve_off_policy(True)
    assert e.value.field == "grpo.off_policy"
    with pytest.raises(ConfigError, match="either importance_ratio or off_policy"):
        OPDSampled(importance_ratio="sampler", off_policy="tis").resolve_off_policy(True)
    batch, logp = _batch()
    batch.sampler_logprobs = None
    obj = GRPO(off_policy="tis")
    obj.resolve_off_policy(False)
    with pytest.raises(ConfigError, match="needs the sampler's log-probs"):
        _loss(obj, batch, logp)


# ------------------------------------------------------------------------------------------------ the schedule
def _stale_pipeline(k: int, steps_per_rollout: int = 1):
    from rlad_pl.data import CharFrequencyTask
    from rlad_pl.pipeline import RolloutPipeline, RolloutSettings
    from rlad_pl.rollout.sampler import SamplingParams
    from rlad_pl.rollout.stale import StaleSampler
    from test_pipeline import _policy

    settings = RolloutSettings(prompts_per_rollout=2, group_size=3, micro_batch_size=6,
                               steps_per_rollout=steps_per_rollout, sampling=SamplingParams(max_new_tokens=6),
                               seed=5, max_off_policy_steps=k)
    pipe = RolloutPipeline(CharFrequencyTask(target="a"), settings, sampler=StaleSampler(), info=lambda s: None)
    policy = _policy([GRPO()])
    pipe.connect(policy)
    return pipe, policy


@pytest.mark.parametrize("k, U", [(2, 1), (3, 2)])
def test_batch_e_is_sampled_from_the_weights_after_step_eU_minus_k(k, U):
    """A training loop without a Trainer: each batch records the version ``max(0, eU - k)`` and its tokens are what
    the synchronous sampler makes from the weights stored at that version with the same seed."""
    from rlad_pl.rollout.hf import HFSampler

    pipe, policy = _stale_pipeline(k, U)
    student = policy.student
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    weights, step, batches = {0: {n: t.clone() for n, t in student.state_dict().items()}}, 0, []
    for epoch in range(4):
        steps = pipe.steps(epoch, step=step)
        batches.append((epoch, steps))
        for j, s in enumerate(steps):
            assert s.stats["off_policy/staleness_mean"] == step - max(0, epoch * U - k)
            opt.zero_grad()
            sum(student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.float().pow(2).mean()
                for mb in s.micro_batches).backward()
            opt.step()
            step += 1
            weights[step] = {n: t.clone() for n, t in student.state_dict().items()}
            pipe.after_step(epoch, j, step)
    pipe.close()
    import copy

    replay = copy.deepcopy(student)
    hf = HFSampler()
    hf.setup(replay, policy.tokenizer)
    cfg = pipe.settings
    for epoch, steps in batches:
        version = max(0, epoch * U - k)
        got = torch.cat([mb.weight_version for s in steps for mb in s.micro_batches])
        assert (got == version).all(), (epoch, got)
        replay.load_state_dict(weights[version])
        problems = pipe.task.problems("train", cfg.prompts_per_rollout, offset=cfg.problem_offset(epoch, 0, 1))
        prompts, _ = pipe.encode_prompts(problems)
        want = hf.generate(prompts, cfg.sampling.with_(seed=cfg.rollout_seed(epoch, 0))).completion_ids
        first = steps[0].micro_batches[0]
        rows = [row[m.bool()].tolist() for row, m in zip(first.response_ids, first.response_mask)]
        if U == 1:  # one step: the micro-batch is the whole batch, in order
            assert rows == want, epoch
        else:
            assert all(r in want for r in rows), epoch


def test_k0_is_the_synchronous_pipeline():
    from test_pipeline import _pipeline, _policy

    pipe = _pipeline()
    assert pipe.asynchronous is None
    pipe.connect(_policy([GRPO()]))
    steps = pipe.steps(0)
    assert all(mb.weight_version is None for s in steps for mb in s.micro_batches)
    assert not any(k.startswith("off_policy/") for k in steps[0].stats)


def test_settings_that_cannot_run_asynchronously_are_one_line(tmp_path):
    from rlad_pl.data import CharFrequencyTask
    from rlad_pl.objectives import SFT
    from rlad_pl.pipeline import RolloutPipeline, RolloutSettings
    from test_pipeline import _policy

    with pytest.raises(ConfigError, match=r"expected an integer >= 0, got -1 \(0 = synchronous\)"):
        RolloutSettings(max_off_policy_steps=-1)
    with pytest.raises(ConfigError, match="HFSampler generates on the trainer.s own device") as e:
        RolloutPipeline(CharFrequencyTask(target="a"), RolloutSettings(max_off_policy_steps=1))
    assert e.value.field == "data.max_off_policy_steps"
    pipe, _ = _stale_pipeline(1)
    with pytest.raises(ConfigError, match="dataset responses, which do not depend on the student"):
        pipe.connect(_policy([SFT(prefix_source="dataset")]))
    # from the command line: one line before any model loads
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--data.max_off_policy_steps", "2",
                "--trainer.default_root_dir", str(tmp_path))
    assert e.value.code not in (0, None)


def test_a_stale_run_from_the_command_line_logs_its_staleness(tmp_path):
    run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--data.max_off_policy_steps", "2",
            "--data.sampler", "rlad_pl.rollout.stale.StaleSampler", "--trainer.max_epochs", "4",
            "--trainer.check_val_every_n_epoch", "4", "--trainer.default_root_dir", str(tmp_path))
    log = tmp_path / "lightning_logs" / "version_0"
    assert scalars(log, "off_policy/staleness_mean") == [0.0, 1.0, 2.0, 2.0]
    assert scalars(log, "off_policy/staleness_max") == [0.0, 1.0, 2.0, 2.0]
    weights = scalars(log, "grpo/off_policy_weight_mean")  # GRPO's declared correction (TIS) is in force
    assert len(weights) == 4 and weights[0] == 1.0 and all(0.5 < w < 2.0 for w in weights)
    drift = scalars(log, "grpo/off_policy_log_ratio_abs")
    assert drift[0] == 0.0 and drift[2] > 0.0  # fresh weights: no drift; two steps old: some
    assert len(scalars(log, "timing/wait_for_rollout")) == 4


# ------------------------------------------------------------------------------------------------ served (slow)
def _served_args(url: str, root, epochs: int, k: int, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "grpo_tiny_server.yaml"), "--data.sampler.init_args.urls", f"[{url}]",
            "--data.max_off_policy_steps", str(k), "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", str(epochs), "--trainer.default_root_dir", str(root), *extra]


needs_vllm = pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vllm is not installed")


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_served_asynchronous_run_overlaps_and_makes_the_stale_samplers_batches(server, tmp_path):
    """k = 2 through a real server: generation of the next batches runs while the trainer trains (``timing/overlap``
    > 0), staleness 0, 1, 2, 2, ...; validation in between takes the current weights and the next batch its own
    snapshot again. The same config with ``StaleSampler`` around the in-process vLLM engine makes the same batches
    (same rewards, tokens and losses): what the staleness study relies on."""
    epochs, k = 6, 2
    served = run_cli(*_served_args(server, tmp_path / "served", epochs, k, "--trainer.check_val_every_n_epoch", "3",
                                   "--trainer.enable_checkpointing", "false", "--export.enabled", "false"))
    log = __import__("pathlib").Path(served.trainer.log_dir)
    assert scalars(log, "off_policy/staleness_mean") == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert max(scalars(log, "timing/overlap")) > 0.0
    assert len(scalars(log, "val/all/mean@4")) == 2
    stale = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny_vllm.yaml"), "--data.max_off_policy_steps", str(k),
                    "--data.sampler", json.dumps({"class_path": "rlad_pl.rollout.stale.StaleSampler", "init_args": {
                        "sampler": {"class_path": "rlad_pl.rollout.vllm.VLLMSampler", "init_args": {
                            "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
                            "engine_kwargs": {"kv_cache_memory_bytes": 64 << 20}}}}}),
                    "--data.micro_batch_size", "32",
                    "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "3",
                    "--trainer.default_root_dir", str(tmp_path / "stale"), "--trainer.enable_checkpointing", "false",
                    "--export.enabled", "false")
    other = __import__("pathlib").Path(stale.trainer.log_dir)
    assert_same_scalars(log, other, ("rollout/reward_mean", "train/tokens", "train/loss", "off_policy/staleness_mean"))


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_kill_9_mid_run_then_ckpt_path_last_resumes(server, tmp_path):
    """SIGKILL the trainer of an asynchronous run (k = 2) once it has a ``last.ckpt`` (possibly during a push, which
    would leave the server paused): ``--ckpt_path last`` finishes the run. The in-flight batches are regenerated from
    the restored weights: staleness restarts at 0 and is back to k two batches later."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    epochs, k = 8, 2
    root = tmp_path / "run"
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rlad_pl", *_served_args(server, root, epochs, k, "--export.enabled", "false",
                                                          "--trainer.check_val_every_n_epoch", "100")]
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while run.poll() is None and time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait(60)
    done = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= done < epochs
    resumed = subprocess.run(cmd + ["--ckpt_path", "last"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = root / "lightning_logs" / "version_1"
    final = log / "checkpoints" / "last.ckpt"
    assert torch.load(final, map_location="cpu", weights_only=True)["global_step"] == epochs
    left = epochs - done
    assert scalars(log, "off_policy/staleness_mean") == [float(min(i, k)) for i in range(left)]
    assert json.loads(urllib.request.urlopen(server + "/is_paused", timeout=10).read())["is_paused"] is False
    assert Path(final).stat().st_size > 0


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_lost_mid_asynchronous_run_stops_in_one_line(tmp_path):
    """As in a synchronous run: the worker's retries fail, the error reaches the trainer when it takes the batch,
    the run stops with one line naming the server and ``last.ckpt`` is complete."""
    import subprocess
    import sys
    import time

    from test_server_sampler import ASSETS, RL_ARGS, free_port, start_server, stop_server, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "run"
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rlad_pl", *_served_args(url, root, 8, 1, "--export.enabled", "false",
                                                          "--trainer.check_val_every_n_epoch", "100",
                                                          "--data.sampler.init_args.retries", "1")]
    proc = start_server(ASSETS / "tiny-student", port, *RL_ARGS)
    try:
        wait_ready(url, proc)
        run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not ckpt.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        stop_server(proc)
        _, err = run.communicate(timeout=300)
    finally:
        stop_server(proc)
    lines = err.strip().splitlines()
    assert run.returncode == 2, err[-3000:]
    assert lines[-1].startswith(f"rlad_pl: error: data.sampler.init_args.urls: the rollout server at {url} did "
                                "not answer"), lines[-3:]
    done = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 1 <= done < 8


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_asynchronously_like_one(server, tmp_path):
    """k = 1 on a trainer of 2 processes (``torchrun --nnodes 2`` on 127.0.0.1, FSDP2 over gloo): rank 0's worker
    makes both ranks' rollouts and scatters them; the losses match the 1-process asynchronous run."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from test_server_sampler import _server_config, _two_nodes

    epochs = 4
    extra = ("--data.max_off_policy_steps", "1")
    one_cfg = _server_config(tmp_path / "one.yaml", server, 4, epochs)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", str(one_cfg), *extra], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    two_cfg = _server_config(tmp_path / "two.yaml", server, 2, epochs)
    _two_nodes(two_cfg, *extra)
    one, two = (cfg.parent / (cfg.stem + "_runs") / "lightning_logs" / "version_0" for cfg in (one_cfg, two_cfg))
    assert scalars(two, "off_policy/staleness_mean") == [0.0, 1.0, 1.0, 1.0]
    assert_same_scalars(one, two, ("train/tokens", "train/loss", "grpo/loss", "rollout/reward_mean"), epochs)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_lora_student_pushes_its_merged_weights_into_the_server(server):
    """A LoRA student (PEFT, ``all-linear``) served from its base: each push sends the merged weights under the
    base's names, and after every SFT step on the adapters the server answers greedily like the trainer."""
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.models.lora import apply_lora
    from rlad_pl.rollout.hf import HFSampler
    from rlad_pl.rollout.sampler import SamplingParams
    from rlad_pl.rollout.server import ServerSampler
    from test_server_sampler import _sft_step

    tok = load_tokenizer("assets/tiny-student")
    student = load_causal_lm("assets/tiny-student", "model.student")
    apply_lora(student, {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    sampler, hf = ServerSampler(urls=[server]), HFSampler()
    sampler.setup(student, tok)  # the served base's names and shapes match the merged weights
    hf.setup(student, tok)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("abc", "hello wor", "aaa b")]
    target = tok("cab bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-2)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    answers = []
    try:
        for step in range(3):
            if step:
                _sft_step(student, opt, prompts, target)
            sampler.sync_weights(student)
            served = sampler.generate(prompts, greedy).completion_ids
            assert served == hf.generate(prompts, greedy).completion_ids, step
            answers.append(served)
        assert answers[-1] != answers[0]  # the adapters changed what the server answers
    finally:
        sampler.close()
