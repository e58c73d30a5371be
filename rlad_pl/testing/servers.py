"""vLLM OpenAI servers on localhost for tests and benchmarks: start one with the RL endpoints, wait for it, stop it.

``start_server(folder, port, *RL_ARGS)`` runs ``python -m vllm.entrypoints.openai.api_server`` (the CPU build's
entry point; ``vllm serve`` fails there) in a session of its own, fp32, eager, no chunked prefill, a small KV cache,
``VLLM_SERVER_DEV_MODE=1`` for the weight-transfer endpoints; ``RL_ARGS`` adds the gloo weight transfer and
log-probs after temperature (what ``ServerSampler`` needs, as ``python -m rlad_pl serve`` sets them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

RL_ARGS = ("--weight-transfer-config", '{"backend": "gloo"}', "--logprobs-mode", "processed_logprobs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path | str, port: int, *extra: str, log: Optional[Path] = None, max_model_len: int = 256,
                 kv_cache_bytes: int = 64 << 20, env: Optional[Mapping[str, str]] = None,
                 cores: Optional[set[int]] = None) -> subprocess.Popen:
    """The server on ``folder`` at 127.0.0.1:``port``; ``extra`` vLLM arguments, ``env`` added to the environment,
    ``cores``: the CPU cores the server's processes may run on (``sched_setaffinity``)."""
    full_env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", "float32",
           "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
           "--kv-cache-memory-bytes", str(kv_cache_bytes), "--no-enable-chunked-prefill", *extra]
    out = open(log, "w") if log else subprocess.DEVNULL
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=pin)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``url/health`` answers; a server that exits or does not answer within ``timeout`` s: RuntimeError."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the vLLM server did not start (exit code {proc.poll()})") from None
            time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


__all__ = ["RL_ARGS", "free_port", "start_server", "wait_ready", "stop_server"]
