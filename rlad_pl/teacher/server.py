"""``ServerTeacher``: the teacher behind an OpenAI-compatible vLLM server (``prompt_logprobs`` extra parameter),
sampled-token log-probs and top-k distributions at T = 1 (``rlad_pl.teacher.base`` for the interface).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import TEACHER_LOGPROBS, TEACHER_TOPK
from rlad_pl.teacher.base import FIELD, TeacherScorer, teacher_layout
from rlad_pl.teacher.entries import _position_entries, _sampled_values, _token_rows, _topk_values


class ServerTeacher(TeacherScorer):
    """The teacher behind an OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``), e.g.
    on its own nodes: sampled-token log-probs from ``POST /v1/completions`` with token-id prompts, ``max_tokens: 1``
    and ``prompt_logprobs: 0``; the top-k (``teacher_top_k: k``) with ``prompt_logprobs: k``, which the server must
    allow: start it with ``--max-logprobs`` >= k (vLLM's default is 20; above it the server answers HTTP 400).

    At the first scoring ``GET /v1/models`` must list ``model`` (default: ``model.teacher`` as written, which is the
    id vLLM serves a ``--model`` folder under); otherwise one line names the ids it serves. The server applies no
    temperature to prompt log-probs and normalises over its whole output layer, so a module temperature other than
    1, or a teacher whose output layer is larger than the shared tokenizer, is refused in one line.

    Args:
        url: server base URL, e.g. ``http://teacher-node:8000`` (``/v1`` is appended).
        model: the model id the server must report (default: ``model.teacher``).
        api_key_env: name of the environment variable that holds the API key (sent as a bearer token; the key is
            never logged or saved, only the variable's name is).
        timeout: seconds per request. retries: extra attempts per request after a connection error / 5xx.
        batch_size: sequences per request.
    """

    provides = frozenset({TEACHER_LOGPROBS, TEACHER_TOPK})
    in_trainer = False

    def __init__(self, url: str, model: Optional[str] = None, api_key_env: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 2, batch_size: int = 32):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{FIELD}.init_args.url", f"expected an http(s) URL, got {url!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"{FIELD}.init_args.timeout", f"expected seconds > 0, got {timeout!r}")
        for name, v, low in (("retries", retries, 0), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{FIELD}.init_args.{name}", f"expected an integer >= {low}, got {v!r}")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ConfigError(f"{FIELD}.init_args.api_key_env", f"the environment variable {api_key_env} is not set")
        self.url, self.model, self.api_key_env = url.rstrip("/").removesuffix("/v1"), model, api_key_env
        self.timeout, self.retries, self.batch_size = float(timeout), retries, batch_size
        self.source = None
        self._checked = False
        self._vocab: Optional[int] = None

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        import json

        self.source = source
        self.model = self.model or source.spec
        try:
            self._vocab = int(json.loads((source.folder / "config.json").read_text())["vocab_size"])
        except (OSError, KeyError, ValueError):
            self._vocab = None
        return None

    def _request(self, path: str, body: Optional[dict] = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
        data = None if body is None else json.dumps(body).encode()
        err = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace").strip().replace("\n", " ")
                err = f"HTTP {e.code} {detail}"
                if e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                err = f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(min(2.0 ** attempt, 10.0))
        raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server at {self.url} did not answer {path} "
                          f"({err}) after {self.retries + 1} attempt(s)")

    def _check_server(self, temperature: float, vocab_size: int) -> None:
        if temperature != 1.0:
            raise ConfigError("model.temperature", f"ServerTeacher scores at temperature 1 (a vLLM server's prompt "
                              f"log-probs), the module uses {temperature:g}; set model.temperature: 1.0 or use "
                              "rlad_pl.teacher.LocalTeacher / VLLMTeacher")
        if self._vocab is not None and self._vocab != vocab_size:
            raise ConfigError(FIELD, f"the teacher's output layer has {self._vocab} rows, the shared tokenizer "
                              f"{vocab_size}; the server normalises over all of them; use rlad_pl.teacher.VLLMTeacher")
        if self._checked:
            return
        served = [m.get("id") for m in self._request("/v1/models").get("data", [])]
        if self.model not in served:
            raise ConfigError(f"{FIELD}.init_args.model", f"the teacher server at {self.url} serves {served}, not "
                              f"'{self.model}' (set model to the served id, or start the server on the teacher)")
        self._checked = True

    def _prompt_logprobs(self, batch: RolloutBatch, temperature: float, vocab_size: int, n: int):
        """``POST /v1/completions`` with ``prompt_logprobs: n`` in batches of ``batch_size`` sequences: per sequence
        and response position, the server's ``{"<token id>": {"logprob": ...}}`` entry and the token there."""
        self._check_server(temperature, vocab_size)
        ids, mask, P = teacher_layout(batch)
        rows, keep, compact = _token_rows(ids, mask)
        plps = []
        for s in range(0, len(rows), self.batch_size):
            part = rows[s:s + self.batch_size]
            try:
                res = self._request("/v1/completions", {"model": self.model, "prompt": part, "max_tokens": 1,
                                                        "temperature": 0.0, "prompt_logprobs": n})
            except ConfigError as e:
                if n > 0 and "HTTP 400" in str(e):  # vLLM: "Requested prompt logprobs of n, ... max allowed: m"
                    raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server at {self.url} refused "
                                      f"prompt_logprobs={n} (teacher_top_k); start it with --max-logprobs {n} or "
                                      f"more ({e.message.split('/v1/completions ')[-1]})") from None
                raise
            choices = sorted(res.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(part):
                raise ConfigError(f"{FIELD}.init_args.url", f"the teacher server answered {len(choices)} choices "
                                  f"for {len(part)} prompts")
            plps.extend(c.get("prompt_logprobs") or [] for c in choices)
        return _position_entries(plps, rows, keep, compact, P, ids.shape[1] - P)

    @torch.no_grad()
    def token_logprobs(self, batch, *, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, 0)
        return _sampled_values(entries, lambda e, tok: (e.get(str(tok)) or {}).get("logprob")).to(
            batch.input_ids.device)

    @torch.no_grad()
    def topk(self, batch, *, k, temperature, chunk_size, vocab_size):
        entries = self._prompt_logprobs(batch, temperature, vocab_size, k)
        return _topk_values(entries, k, lambda e: {int(t): float(v["logprob"]) for t, v in e.items()}).to(
            batch.input_ids.device)


__all__ = ["ServerTeacher"]
