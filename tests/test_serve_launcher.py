"""``python -m rlad_pl serve`` (``rlad_pl.rollout.launch``): the vLLM server command built from a training config.

Fast tier: the flags for the demo, a tiny config and a LoRA config; ``max_model_len`` from the prompt and response
lengths; what ``-- extra args`` replace; students that cannot be served (one line); ``--print-only`` in a
subprocess (one command line, no Lightning import). ``slow`` + ``vllm``: the printed command for
``configs/server_demo.yaml`` runs (``/health``, ``/v1/models``, ``GET /weight_info``, a completion) and stops on
SIGTERM without leftover processes; the subcommand itself runs it in the foreground and ends on SIGINT.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, REPO
from rlad_pl.core.errors import ConfigError
from rlad_pl.rollout.launch import (
    DEFAULT_MAX_PROMPT_LENGTH,
    command_for_config,
    format_command,
    kv_cache_bytes_for,
    launch,
    server_command,
    stop,
    wait_ready,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ASSETS = REPO / "rlad_pl" / "assets"
DEMO, SERVER_DEMO, TINY, LORA = (CONFIGS / f"{n}.yaml" for n in ("demo", "server_demo", "grpo_tiny", "grpo_lora_tiny"))


def opts(argv: list[str]) -> dict:
    """``--flag value`` pairs and bare ``--flag``s (value None) of a command."""
    out = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def serve(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlad_pl", "serve", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, **kw)


def test_default_prompt_length_is_the_trainers():
    from rlad_pl.pipeline.settings import RolloutSettings
    from rlad_pl.training.datamodule import RolloutDataModule

    field = {f.name: f for f in dataclasses.fields(RolloutSettings)}["max_prompt_length"]
    assert DEFAULT_MAX_PROMPT_LENGTH == field.default
    assert inspect.signature(RolloutDataModule).parameters["max_prompt_length"].default == field.default


def test_demo_command_cpu():
    argv, env = command_for_config(DEMO, device="cpu")
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    o = opts(argv)
    assert o["--model"] == str((ASSETS / "demo-student").resolve())  # assets/... resolved inside the package
    assert o["--served-model-name"] == "assets/demo-student"
    assert o["--dtype"] == "float32"
    # 1024 (default max_prompt_length) + 64 new tokens, capped at the student's 160 positions
    assert o["--max-model-len"] == "160"
    assert json.loads(o["--weight-transfer-config"]) == {"backend": "gloo"}
    assert o["--logprobs-mode"] == "processed_logprobs"
    assert o["--generation-config"] == "vllm"
    assert "--enforce-eager" in o and "--no-enable-chunked-prefill" in o
    assert int(o["--kv-cache-memory-bytes"]) == 64 * 2**20
    assert (o["--host"], o["--port"]) == ("127.0.0.1", "8000")
    assert "--revision" not in o and "--tokenizer" not in o  # a folder, its own tokenizer


def test_gpu_command():
    """gloo on GPU too (ServerSampler's default transport); nccl on request or from the config's sampler; nccl on a
    CPU server is one line."""
    argv, env = command_for_config(TINY, {"model.dtype": "bfloat16"}, device="cuda", host="0.0.0.0", port=8011)
    o = opts(argv)
    assert json.loads(o["--weight-transfer-config"]) == {"backend": "gloo"}
    assert o["--dtype"] == "bfloat16" and (o["--host"], o["--port"]) == ("0.0.0.0", "8011")
    for cpu_only in ("--enforce-eager", "--no-enable-chunked-prefill", "--kv-cache-memory-bytes"):
        assert cpu_only not in o
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    o = opts(command_for_config(TINY, device="cuda", backend="nccl")[0])
    assert json.loads(o["--weight-transfer-config"]) == {"backend": "nccl"}
    assert json.loads(opts(server_command("org/m", max_model_len=64, device="cuda")[0])["--weight-transfer-config"]) \
        == {"backend": "gloo"}
    nccl_sampler = {"data.sampler": {"class_path": "rlad_pl.rollout.server.ServerSampler",
                                     "init_args": {"urls": ["http://127.0.0.1:8000"], "backend": "nccl"}}}
    o = opts(command_for_config(TINY, nccl_sampler, device="cuda")[0])
    assert json.loads(o["--weight-transfer-config"]) == {"backend": "nccl"}
    with pytest.raises(ConfigError, match=r"^backend: nccl needs GPU servers"):
        command_for_config(TINY, nccl_sampler, device="cpu")


@pytest.mark.parametrize("args", [("--backend", "nccl"), ("--", "--weight-transfer-config", '{"backend": "nccl"}'),
                                  ("--", '--weight-transfer-config={"backend": "nccl"}')])
def test_another_backend_is_built_with_a_one_line_warning(args):
    out = serve("--config", "configs/server_demo.yaml", "--print-only", "--device", "cuda", *args)
    assert out.returncode == 0, out.stderr
    assert """'{"backend": "nccl"}'""" in out.stdout or """'--weight-transfer-config={"backend": "nccl"}'""" \
        in out.stdout, out.stdout
    assert out.stderr == ("rlad_pl: warning: --backend: nccl: this config's ServerSampler pushes weights over gloo "
                          "(data.sampler.init_args.backend); `fit` cannot push into a nccl server\n")
    out = serve("--config", "configs/server_demo.yaml", "--print-only", "--device", "cuda", "--backend", "rlad_gloo")
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_max_model_len():
    def mml(**over):
        return int(opts(command_for_config(TINY, over, device="cpu")[0])["--max-model-len"])

    assert mml() == 256  # 1024 + 12, capped at the tiny student's 256 positions
    assert mml(**{"data.max_prompt_length": 100}) == 112
    assert mml(**{"data.max_prompt_length": 100, "data.val_sampling": {"max_new_tokens": 30}}) == 130
    assert mml(**{"data.max_prompt_length": 100, "data.val_sampling": {"temperature": 0.5}}) == 100 + 64
    assert mml(**{"data.sampler": {"class_path": "x.Y", "init_args": {"max_model_len": 200}}}) == 200
    with pytest.raises(ConfigError, match=r"^data\.sampling\.max_new_tokens: 300 leaves no room .*256"):
        mml(**{"data.sampling.max_new_tokens": 300})


def test_server_demo_port_from_urls_and_lora_serves_the_base():
    assert opts(command_for_config(SERVER_DEMO, device="cpu")[0])["--port"] == "8000"
    urls = {"data.sampler.init_args.urls": ["http://node7:8123", "http://node8:8123"]}
    assert opts(command_for_config(SERVER_DEMO, urls, device="cpu")[0])["--port"] == "8123"
    o = opts(command_for_config(LORA, device="cpu")[0])  # model.lora: the base model is served, merged pushes
    assert o["--model"] == str((ASSETS / "demo-student").resolve())


def test_tokenizer_of_its_own_and_interpolation():
    o = opts(command_for_config(TINY, device="cpu")[0])  # tokenizer: ${model.student}
    assert "--tokenizer" not in o
    o = opts(command_for_config(TINY, {"model.tokenizer": "assets/tiny-teacher"}, device="cpu")[0])
    assert o["--tokenizer"] == str((ASSETS / "tiny-teacher").resolve())


def test_extra_args_come_last_and_replace():
    argv, _ = command_for_config(DEMO, device="cpu", extra_args=["--no-enforce-eager", "--kv_cache_memory_bytes=7",
                                                                 "--max-num-seqs", "4"])
    assert argv[-4:] == ["--no-enforce-eager", "--kv_cache_memory_bytes=7", "--max-num-seqs", "4"]
    assert "--enforce-eager" not in argv and "--kv-cache-memory-bytes" not in argv


def test_server_command_directly(tmp_path):
    argv, env = server_command("org/model", host="h", port=1234, dtype="float16", max_model_len=99, device="cpu",
                               revision="abc")
    o = opts(argv)
    assert (o["--model"], o["--revision"], o["--max-model-len"]) == ("org/model", "abc", "99")
    assert int(o["--kv-cache-memory-bytes"]) == 2**30  # no config.json to size it from
    line = format_command(argv, env)
    assert line.startswith("VLLM_SERVER_DEV_MODE=1 ") and """'{"backend": "gloo"}'""" in line
    assert shlex.split(line)[1:] == argv
    with pytest.raises(ConfigError, match="^port:"):
        server_command("m", port=70000, max_model_len=8, device="cpu")
    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert kv_cache_bytes_for(cfg, "bfloat16", 512) == 2 * 30 * 3 * 64 * 2 * 512 * 128  # SmolLM2-135M
    assert kv_cache_bytes_for(cfg, "bfloat16", 8192) == 4 * 2**30


def _student_copy(tmp_path, **config):
    folder = tmp_path / "student"
    shutil.copytree(ASSETS / "demo-student", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return str(folder)


def test_students_that_cannot_be_served(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.student: .*head_dim 48; vLLM's CPU attention"):
        command_for_config(DEMO, {"model.student": _student_copy(tmp_path, head_dim=48)}, device="cpu")
    assert command_for_config(DEMO, {"model.student": _student_copy(tmp_path / "b", head_dim=48)}, device="cuda")
    with pytest.raises(ConfigError, match=r"^model\.student: .*holds bitsandbytes weights"):
        command_for_config(DEMO, {"model.student": _student_copy(
            tmp_path / "c", quantization_config={"quant_method": "bitsandbytes"})}, device="cpu")
    with pytest.raises(ConfigError, match=r"^model\.student: expected the student's folder or hub id, got None"):
        command_for_config(DEMO, {"model.student": None}, device="cpu")
    with pytest.raises(ConfigError, match=r"^model\.student: no such local folder '\./nope'"):
        command_for_config(DEMO, {"model.student": "./nope"}, device="cpu")


def test_print_only_prints_one_command_line():
    out = serve("--config", "configs/server_demo.yaml", "--print-only", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and out.stderr == ""
    assert lines[0] == format_command(*command_for_config(SERVER_DEMO, device="cpu"))
    words = shlex.split(lines[0])
    assert words[0] == "VLLM_SERVER_DEV_MODE=1" and words[2:4] == ["-m", "vllm.entrypoints.openai.api_server"]
    # options of its own, overrides like fit's, and vLLM's arguments after `--`
    out = serve("--config", "configs/demo.yaml", "--print-only", "--device", "cpu", "--port", "8100",
                "--data.max_prompt_length", "50", "--", "--max-num-seqs", "16")
    assert out.returncode == 0, out.stderr
    o = opts(shlex.split(out.stdout)[1:])
    assert (o["--port"], o["--max-model-len"], o["--max-num-seqs"]) == ("8100", "114", "16")
    assert out.stderr.startswith("rlad_pl: warning: data.sampler: ")  # demo.yaml samples in the trainer


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  student: ./no-such-student\n")
    for args, start in (((str(bad),), "rlad_pl: error: model.student: no such local folder './no-such-student'"),
                        (("configs/demo.yaml", "--bogus"), "rlad_pl: error: serve: unrecognized argument '--bogus'"),
                        (("nope.yaml",), "rlad_pl: error: --config: no such file 'nope.yaml'")):
        out = serve("--config", *args, "--print-only")
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(start), out.stderr
    bad.write_text("model:\n  student: [unclosed\n")
    out = serve("--config", str(bad), "--print-only")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"rlad_pl: error: {bad}:3:1: YAML syntax error"), out.stderr


def test_serve_dispatch_imports_no_lightning():
    code = ("import sys; from rlad_pl.cli import main; "
            "assert main(['serve', '--config', 'configs/server_demo.yaml', '--print-only']) == 0; "
            "assert 'lightning' not in sys.modules and 'vllm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------------ real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env() -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the in-process engines' setting, not a server's
    return env


def _check_and_stop(proc, url: str, log, sig=signal.SIGTERM, argv=None) -> None:
    """The served demo student answers; ``argv``: the command line the server process must have (an ``exec``).
    Then ``sig`` ends it, and its engine process with it."""
    import psutil

    from rlad_pl.rollout.server_client import VLLMServerClient

    try:
        wait_ready(url, proc, timeout=300)
        client = VLLMServerClient(url, timeout=60)
        assert client.models() == ["assets/demo-student"]
        assert client._get("/v1/models")["data"][0]["max_model_len"] == 160
        assert client.weight_info()["weight_version"] == "default"
        out = client.completions([[1, 3, 4]], n=2, max_tokens=4, temperature=1.0, seed=0)
        assert len(out) == 2 and all(1 <= len(c.token_ids) <= 4 and len(c.logprobs) == len(c.token_ids)
                                     for c in out)
        if argv is not None:
            assert psutil.Process(proc.pid).cmdline() == argv
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "the server's engine runs in a child process"
    except BaseException:
        stop(proc)
        log.seek(0)
        print(log.read()[-6000:])
        raise
    if sig == signal.SIGTERM:
        assert stop(proc) is not None
    else:
        proc.send_signal(sig)
        proc.wait(60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == [], f"left over: {alive}"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_printed_command_serves_the_demo_student(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # the in-process engines' setting
    port = _free_port()
    out = serve("--config", "configs/server_demo.yaml", "--port", str(port), "--print-only", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    env = dict(w.split("=", 1) for w in words[:1])
    argv = words[1:]
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    with open(tmp_path / "server.log", "w+") as log:
        proc = launch(argv, env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)  # runs from anywhere
        _check_and_stop(proc, f"http://127.0.0.1:{port}", log)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_serve_runs_in_the_foreground_and_ends_on_sigint(tmp_path):
    port = _free_port()
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rlad_pl", "serve", "--config", "configs/server_demo.yaml",
                                 "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env=_server_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "server.log").read_text().strip():
            time.sleep(0.2)
        printed = (tmp_path / "server.log").read_text().splitlines()[0]
        assert printed.startswith("VLLM_SERVER_DEV_MODE=1 ") and f"--port {port}" in printed
        _check_and_stop(proc, f"http://127.0.0.1:{port}", log, sig=signal.SIGINT,
                        argv=shlex.split(printed)[1:])  # this very process became the printed command
