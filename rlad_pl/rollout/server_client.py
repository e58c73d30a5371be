"""Trainer-side client of a vLLM OpenAI-compatible server with the RL API (``VLLM_SERVER_DEV_MODE=1``): health,
pause / resume, weight pushes over the gloo weight-transfer backend (``rlad_pl.rollout.gloo_transfer``), and
token-id completions with the sampled tokens' log-probs. ``backend="nccl"`` pushes over NCCL instead, through vLLM's
own trainer engine (``rlad_pl.rollout.nccl_transfer``); the pause / prefix-cache reset / resume around it are the same.

Standard library HTTP only (``urllib``). The object implements vLLM's ``VLLMWeightSyncClient`` protocol
(``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``), so it can
also drive vLLM's own trainer engines.

A push (``push_weights``) is: ``POST /pause`` -> ``POST /start_weight_update`` -> per bucket ``POST /update_weights``
(``{"update_info": {"names", "dtype_names", "shapes"}}``) in a thread while this process broadcasts the bucket over
gloo (the HTTP call returns only once the workers received and loaded it) -> ``POST /finish_weight_update`` ->
``POST /reset_prefix_cache`` (when the server has it) -> ``POST /resume``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from rlad_pl.rollout.gloo_transfer import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    GlooWeightSender,
    bucket_update_info,
    iter_buckets,
    run_concurrently,
)


class ServerError(RuntimeError):
    """An HTTP error status from the server (``status``, ``body`` kept)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


@dataclass
class ServerCompletion:
    """One sampled completion: ``prompt_index`` into the request's prompts, its ``index`` among that prompt's ``n``;
    ``logprobs`` are the sampled tokens' log-probs (vLLM's default ``raw_logprobs``: ``log_softmax`` of the logits
    before temperature / top-k / top-p) or None when not requested."""

    prompt_index: int
    index: int
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[float] | None


def model_weights(model: torch.nn.Module, tied: bool | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """What a push sends for a Hugging Face model: checkpoint-named parameters (wrapper prefixes stripped, a LoRA
    student's merged weights, a tied ``lm_head`` skipped: ``rlad_pl.rollout.vllm_sync.named_weights``). ``tied``
    defaults to ``model.config.tie_word_embeddings``."""
    from rlad_pl.rollout.vllm_sync import named_weights

    if tied is None:
        cfg = getattr(model, "config", None)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return named_weights(model, tied)


class VLLMServerClient:
    """One vLLM server. ``url`` like ``http://127.0.0.1:8000``; ``api_key`` is sent as a bearer token when set;
    ``timeout`` bounds every HTTP call (a weight push's ``/update_weights`` waits for the bucket's transfer);
    ``backend``: the weight transfer, ``gloo`` (any device) or ``nccl`` (a GPU trainer and GPU servers)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 backend: str = "gloo") -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.backend = backend
        self.sender: Any = None  # GlooWeightSender or rlad_pl.rollout.nccl_transfer.NCCLWeightSender
        self._pending_version: str | None = None  # what vLLM's NCCL engine's finish_weight_update() reports
        self._model: str | None = None
        self._has_reset_prefix_cache: bool | None = None

    # ------------------------------------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None,
                 timeout: float | None = None) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v
                                                 for k, v in query.items()})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(method, path, exc.code, exc.read().decode(errors="replace")) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def _post(self, path: str, body: Any = None, **kw) -> Any:
        return self._request("POST", path, body, **kw)

    def _get(self, path: str, **kw) -> Any:
        return self._request("GET", path, **kw)

    # ------------------------------------------------------------------------------------------------ basics

    def health(self) -> bool:
        """``GET /health`` answered 200 (False while starting or when unreachable)."""
        try:
            self._get("/health", timeout=5)
            return True
        except (OSError, ServerError):
            return False

    def wait_until_ready(self, timeout: float = 180.0, proc=None) -> None:
        """Poll ``/health`` until it answers; ``proc`` (a ``subprocess.Popen``) ends the wait early if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready")
            if self.health():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f} s")

    def models(self) -> list[str]:
        """Served model ids (``GET /v1/models``)."""
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def pause(self, mode: str = "abort") -> dict:
        """``POST /pause?mode=`` (``abort`` in-flight requests, ``wait`` for them, or ``keep`` them frozen)."""
        return self._post("/pause", query={"mode": mode})

    def resume(self) -> dict:
        return self._post("/resume")

    def is_paused(self) -> bool:
        return bool(self._get("/is_paused")["is_paused"])

    def weight_info(self) -> dict:
        """``{"weight_version": ...}`` (``"default"`` until a push sets one)."""
        return self._get("/weight_info")

    def world_size(self) -> int:
        """Inference workers across data parallel ranks (``GET /get_world_size``): the gloo group's ``size - 1``."""
        return int(self._get("/get_world_size")["world_size"])

    def reset_prefix_cache(self) -> bool | None:
        """``POST /reset_prefix_cache`` (dev-mode route); None when the server has no such route."""
        if self._has_reset_prefix_cache is False:
            return None
        try:
            out = self._post("/reset_prefix_cache")
        except ServerError as exc:
            if exc.status in (404, 405):
                self._has_reset_prefix_cache = False
                return None
            raise
        self._has_reset_prefix_cache = True
        return bool(out.get("success", True)) if isinstance(out, dict) else True

    # ------------------------------------------------------------------------------ VLLMWeightSyncClient

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        weight_version = self._pending_version if weight_version is None else weight_version
        self._post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})

    # ------------------------------------------------------------------------------------------------ weight push

    def init_transfer(self, *, master_address: str = "127.0.0.1", master_port: int = 0,
                      num_workers: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Open the transfer group with the server's workers (the server must run with ``--weight-transfer-config
        '{"backend": "<self.backend>"}'``). ``master_address``: this machine as the server reaches it; ``master_port``
        0 picks a free port; ``num_workers`` defaults to the server's ``/get_world_size``. Returns the init info."""
        self.close_transfer()
        timeout_s = self.timeout if timeout_s is None else timeout_s
        workers = self.world_size() if num_workers is None else num_workers
        if self.backend == "nccl":
            from rlad_pl.rollout.nccl_transfer import NCCLWeightSender

            nccl = NCCLWeightSender(master_address, master_port, num_workers=workers)
            try:
                info = nccl.open(self)
            except BaseException:
                nccl.close()
                raise
            self.sender = nccl
            return info
        sender = GlooWeightSender(master_address, master_port, num_workers=workers, timeout_s=timeout_s)
        info = sender.open()
        try:
            run_concurrently(lambda: self.init_weight_transfer_engine(info), sender.connect, timeout_s=timeout_s,
                             what="init_weight_transfer_engine")
        except BaseException:
            sender.close()
            raise
        self.sender = sender
        return info

    def close_transfer(self, notify_server: bool = False) -> None:
        """Drop the gloo group (``notify_server``: also ``POST /shutdown_weight_transfer_engine``)."""
        if self.sender is not None:
            if notify_server:
                try:
                    self.shutdown_weight_transfer_engine()
                except (OSError, ServerError):
                    pass
            self.sender.close()
        self.sender = None

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        assert self.sender is not None
        info = bucket_update_info(bucket)
        work, packed, nbytes = self.sender.start_broadcast(bucket)  # enqueued: gloo waits for the workers
        run_concurrently(lambda: self.update_weights(info), work.wait, timeout_s=self.timeout,
                         what="update_weights")
        del packed
        return nbytes

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                     | Callable[[], Iterable[tuple[str, torch.Tensor]]], *, dtype: torch.dtype | None = None,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES, weight_version: str | None = None,
                     pause_mode: str = "abort", is_sender: bool = True) -> dict[str, Any]:
        """Push ``(checkpoint name, tensor)`` pairs (e.g. ``model_weights(model)``; DTensors are gathered bucket by
        bucket) into the server: pause -> start -> buckets -> finish -> prefix-cache reset -> resume. ``dtype``
        casts before sending (send the server's dtype). On FSDP ranks other than 0 pass ``is_sender=False``: the
        buckets are gathered (same collectives, same order) and nothing is sent. Returns ``{"bytes", "seconds",
        "buckets", "tensors", "weight_version"}``. ``named_tensors`` may be a function returning them (NCCL reads them
        twice: metadata, then data; an iterable is then held as a list)."""
        t0 = time.perf_counter()
        nbytes = buckets = tensors = 0
        if self.backend == "nccl":
            return self._push_nccl(named_tensors, dtype, weight_version, pause_mode, is_sender, t0)
        if callable(named_tensors):
            named_tensors = named_tensors()
        if not is_sender:
            for bucket in iter_buckets(named_tensors, bucket_bytes, dtype):
                buckets += 1
                tensors += len(bucket)
            return {"bytes": 0, "seconds": time.perf_counter() - t0, "buckets": buckets, "tensors": tensors,
                    "weight_version": weight_version}
        if self.sender is None:
            raise RuntimeError("VLLMServerClient.init_transfer() first")
        self.pause(pause_mode)
        started = group_ok = False
        try:
            self.start_weight_update()
            started = group_ok = True
            for bucket in iter_buckets(named_tensors, bucket_bytes, dtype):
                group_ok = False  # a failure inside the transfer leaves the gloo group unusable
                nbytes += self._send_bucket(bucket)
                group_ok = True
                buckets += 1
                tensors += len(bucket)
            started = False
            self.finish_weight_update(weight_version)
            self.reset_prefix_cache()
        except BaseException:
            if started and group_ok:  # close the worker's reload session; the transfer itself is still sound
                try:
                    self.finish_weight_update()
                except (OSError, ServerError):
                    pass
            if not group_ok:
                self.close_transfer()
            raise
        finally:
            try:
                self.resume()
            except (OSError, ServerError):
                pass
        return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "buckets": buckets, "tensors": tensors,
                "weight_version": weight_version}

    def _push_nccl(self, named_tensors, dtype, weight_version, pause_mode, is_sender, t0) -> dict[str, Any]:
        from rlad_pl.rollout.nccl_transfer import weight_source

        if callable(named_tensors):
            weights = named_tensors
        else:
            pairs = list(named_tensors)
            weights = lambda: iter(pairs)  # noqa: E731
        if not is_sender:  # the sender's passes, for the FSDP2 gathers (vLLM's engine does the same on such ranks)
            source = weight_source(weights, dtype)
            source.metadata()
            for _ in source:
                pass
            return {"bytes": 0, "seconds": time.perf_counter() - t0, "buckets": 1,
                    "tensors": source.sent_tensors, "weight_version": weight_version}
        if self.sender is None:
            raise RuntimeError("VLLMServerClient.init_transfer() first")
        self.pause(pause_mode)
        try:
            self._pending_version = weight_version
            stats = self.sender.send(weights, dtype)
            self.reset_prefix_cache()
        except BaseException:
            self.close_transfer()  # a failed NCCL round leaves the group unusable
            raise
        finally:
            self._pending_version = None
            try:
                self.resume()
            except (OSError, ServerError):
                pass
        return {**stats, "seconds": time.perf_counter() - t0, "weight_version": weight_version}

    # ------------------------------------------------------------------------------------------------ sampling

    def completions(self, prompt_token_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0,
                    max_tokens: int = 16, logprobs: int | None = 0, seed: int | None = None,
                    top_p: float | None = None, top_k: int | None = None,
                    stop_token_ids: list[int] | None = None, model: str | None = None,
                    extra: dict[str, Any] | None = None) -> list[ServerCompletion]:
        """``POST /v1/completions`` with token-id prompts; returns ``len(prompts) * n`` completions in prompt-major
        order. Completion token ids come from ``return_token_ids`` (``choice.token_ids``); ``logprobs=0`` asks for
        the sampled tokens' log-probs only (None: none)."""
        if model is None:
            if self._model is None:
                self._model = self.models()[0]
            model = self._model
        body: dict[str, Any] = {"model": model, "prompt": [list(map(int, p)) for p in prompt_token_ids], "n": n,
                                "temperature": temperature, "max_tokens": max_tokens, "return_token_ids": True}
        if logprobs is not None:
            body["logprobs"] = logprobs
        for key, value in (("seed", seed), ("top_p", top_p), ("top_k", top_k), ("stop_token_ids", stop_token_ids)):
            if value is not None:
                body[key] = value
        body.update(extra or {})
        out = self._post("/v1/completions", body)
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompt_token_ids) * n:
            raise RuntimeError(f"expected {len(prompt_token_ids) * n} choices, got {len(choices)}")
        results = []
        for c in choices:
            lp = c.get("logprobs")
            results.append(ServerCompletion(
                prompt_index=c["index"] // n, index=c["index"] % n, token_ids=list(c.get("token_ids") or []),
                finish_reason=c.get("finish_reason"), stop_reason=c.get("stop_reason"),
                logprobs=None if lp is None else [float(x) for x in lp["token_logprobs"]]))
        return results


__all__ = ["ServerCompletion", "ServerError", "VLLMServerClient", "model_weights"]
