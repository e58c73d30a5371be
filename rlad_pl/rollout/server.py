"""Rollouts from vLLM servers of their own, with the trainer's weights pushed into them after every optimizer step
(docs/servers.md).

``ServerSampler`` is a ``Sampler`` (``data.sampler``) whose engines are OpenAI-compatible vLLM servers started apart
from the trainer (``python -m rlad_pl serve``, or vLLM's own command on other nodes):

1. ``setup`` checks each server before any compute, one line each: the API key variable is set, the server answers,
   it serves the student's architecture (the served folder's parameter names and shapes against the student's, the
   first difference named, when the trainer can read that folder), it reports log-probs after temperature
   (``--logprobs-mode processed_logprobs``), and its weight-transfer engine opens (``--weight-transfer-config``;
   ``backend``: gloo on any device, ``rlad_pl.rollout.gloo_transfer``, or nccl from a GPU trainer into GPU servers
   through vLLM's own NCCL engine, ``rlad_pl.rollout.nccl_transfer``).
2. ``sync_weights(model)``: rank 0 pushes the current weights into every server through vLLM's RL endpoints (pause ->
   start_weight_update -> one ``/update_weights`` per bucket while the bucket is broadcast -> finish -> prefix-cache
   reset -> resume: ``rlad_pl.rollout.server_client``). FSDP2 parameters are gathered a bucket at a time on every rank
   in the same order, only rank 0 sends; then every rank waits for the push (a broadcast of its statistics),
   so nobody samples old weights.
   Tied embeddings are sent once, a LoRA student sends its merged weights.
3. ``generate``: one request per prompt (``n`` samples, its own seed, prompt as token ids), spread round-robin over the
   servers and sent concurrently; each returns the completion ids, whether it ended with eos, and the sampled tokens'
   log-probs at the sampling temperature. When the served LM head has more rows than the tokenizer, requests carry
   ``allowed_token_ids`` so padded rows are never sampled.

**A lost server.** Every request is retried with exponential back-off (``retries``); a push that fails re-opens the
weight transfer once the server answers again (a restarted server). When the retries are spent the run stops with one
line naming the server; ``last.ckpt`` of the last finished rollout batch is intact, and ``--ckpt_path last`` resumes
once the server is back (the resumed run pushes its restored weights before it samples).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.models.distributed import rank_world
from rlad_pl.rollout.sampler import Generation, Sampler, SamplingParams

FIELD = "data.sampler.init_args"
T = TypeVar("T")

#: what a server's transport errors look like (``urllib`` raises ``URLError``, an ``OSError``)
_LOST = (OSError, TimeoutError, ConnectionError)


#: ``backend`` values (``rlad_gloo``: the gloo engine's alias)
BACKENDS = ("gloo", "rlad_gloo", "nccl")


def _check_nccl_trainer() -> None:
    """``backend: nccl`` needs a CUDA GPU in this process and vLLM's trainer-side engine: one line before compute."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{FIELD}.backend", "nccl needs a CUDA GPU in the trainer (torch sees none); use gloo, "
                          "which pushes through CPU memory on any device")
    try:
        import vllm.distributed.weight_transfer.nccl_engine  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{FIELD}.backend", f"nccl pushes through vLLM's trainer-side NCCL engine, which does not "
                          f"import here ({type(e).__name__}: {e}); install vllm beside the trainer, or use gloo"
                          ) from None


def _mix_seed(seed: int) -> int:
    from rlad_pl.rollout.vllm import _mix_seed as mix

    return mix(seed)


class ServerSampler(Sampler):
    """Rollouts from one or more vLLM OpenAI servers, weights pushed after every optimizer step.

    Args:
        urls: the servers (``http://host:port``), a list or one string; requests are spread over them.
        api_key_env: name of an environment variable holding the servers' API key (sent as a bearer token).
        timeout: seconds per HTTP call (a push's ``/update_weights`` waits for its bucket).
        retries: extra attempts per request after a connection error or an HTTP 5xx, with back-off 1, 2, 4.. s.
        max_concurrency: requests in flight at once (all servers together).
        sync_bucket_bytes: bytes per weight-transfer bucket.
        master_address: this trainer's address as the servers reach it (the weight transfer's rendezvous).
        master_port: its port (0: a free one).
        check_model: compare the served folder's parameter names and shapes with the student's at setup.
        backend: the weight transfer, ``gloo`` (any device: the trainer's tensors go through CPU memory) or ``nccl``
            (a GPU trainer with vLLM installed, GPU servers started with the same backend).
    """

    def __init__(self, urls: list[str] | str, api_key_env: Optional[str] = None, timeout: float = 600.0,
                 retries: int = 3, max_concurrency: int = 64, sync_bucket_bytes: int = 256 << 20,
                 master_address: str = "127.0.0.1", master_port: int = 0, check_model: bool = True,
                 backend: str = "gloo"):
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ConfigError(f"{FIELD}.urls", f"expected a list of server URLs like http://127.0.0.1:8000, "
                              f"got {urls!r}")
        for name, value, low in (("retries", retries, 0), ("max_concurrency", max_concurrency, 1),
                                 ("sync_bucket_bytes", sync_bucket_bytes, 1), ("master_port", master_port, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{FIELD}.{name}", f"expected an integer >= {low}, got {value!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"{FIELD}.backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if not timeout > 0:
            raise ConfigError(f"{FIELD}.timeout", f"expected seconds > 0, got {timeout!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.api_key_env, self.timeout, self.retries = api_key_env, float(timeout), retries
        self.max_concurrency, self.sync_bucket_bytes = max_concurrency, sync_bucket_bytes
        self.master_address, self.master_port, self.check_model = master_address, master_port, check_model
        self.backend = "gloo" if backend == "rlad_gloo" else backend
        if self.backend == "nccl":
            _check_nccl_trainer()
        self.clients: list = []
        self.max_model_len: Optional[int] = None  # the smallest of the servers' (known after setup)
        self._allowed: Optional[list[int]] = None
        self._tied = False
        self._version = 0

    # ------------------------------------------------------------------------------------------------ helpers
    def _retry(self, url: str, what: str, call: Callable[[], T]) -> T:
        """``call()`` with retries and back-off on transport errors and HTTP 5xx; then one line."""
        from rlad_pl.rollout.server_client import ServerError

        err = ""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except ServerError as e:
                err = f"HTTP {e.status} {e.body[:200].strip()}"
                if e.status < 500:
                    raise ConfigError(f"{FIELD}.urls", f"the rollout server at {url} refused {what}: {err}") from None
            except (*_LOST, RuntimeError) as e:  # RuntimeError: the client's transfer failed on one side
                err = f"{type(getattr(e, 'reason', e)).__name__}: {str(getattr(e, 'reason', e))[:200]}"
            if attempt < self.retries:
                time.sleep(min(2.0 ** attempt, 10.0))
        raise ConfigError(f"{FIELD}.urls", f"the rollout server at {url} did not answer {what} ({err}) after "
                          f"{self.retries + 1} attempt(s); restart it, then resume with --ckpt_path last")

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        from rlad_pl.rollout.server_client import VLLMServerClient

        super().setup(model, tokenizer)
        key = None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"{FIELD}.api_key_env", f"environment variable {self.api_key_env} is not set "
                                  "(it should hold the servers' API key)")
        cfg = getattr(model, "config", None)
        self._tied = bool(getattr(cfg, "tie_word_embeddings", False))
        rows = model.get_output_embeddings().weight.shape[0]
        self._allowed = list(range(len(tokenizer))) if rows > len(tokenizer) else None
        rank, _ = rank_world()
        self.clients = [VLLMServerClient(u, api_key=key, timeout=self.timeout, backend=self.backend)
                        for u in self.urls]
        lengths = []
        for client in self.clients:
            info = self._retry(client.url, "GET /v1/models", lambda c=client: c._get("/v1/models"))
            served = (info or {}).get("data") or [{}]
            client._model = served[0].get("id")
            if rank == 0 and self._retry(client.url, "GET /is_paused", client.is_paused):
                # a trainer stopped mid-push (kill -9) leaves the server paused: every request would wait forever
                print(f"rlad_pl: the rollout server at {client.url} was paused (a trainer stopped during a weight "
                      "push?); resuming it")
                self._retry(client.url, "POST /resume", client.resume)
            if served[0].get("max_model_len"):
                lengths.append(int(served[0]["max_model_len"]))
            if self.check_model:
                check_served_model(client.url, served[0].get("root") or client._model, model)
            self._check_logprobs_mode(client)
            if rank == 0:
                self._open_transfer(client)
        self.max_model_len = min(lengths) if lengths else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank still checks a server that rank 0's first push pauses

    def _open_transfer(self, client) -> None:
        from rlad_pl.rollout.server_client import ServerError

        try:
            client.init_transfer(master_address=self.master_address, master_port=self.master_port,
                                 timeout_s=self.timeout)
        except (ServerError, RuntimeError) as e:  # the client reports the server's side as a RuntimeError
            cause = e.__cause__ if isinstance(e.__cause__, ServerError) else e
            status = f"HTTP {cause.status}" if isinstance(cause, ServerError) else type(cause).__name__
            raise ConfigError(f"{FIELD}.urls", f"the rollout server at {client.url} cannot receive weights "
                              f"({status} on /init_weight_transfer_engine); start it with "
                              f"--weight-transfer-config '{{\"backend\": \"{self.backend}\"}}' (this sampler's "
                              "backend) and VLLM_SERVER_DEV_MODE=1, as python -m rlad_pl serve does") from None

    def _check_logprobs_mode(self, client) -> None:
        """The server must report log-probs after temperature (what the trainer computes): two one-token requests
        at T = 1 and T = 0.5 give the same top log-probs only when it reports raw ones."""
        prompt = [[int(self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                       else self.tokenizer.eos_token_id)]]

        def top(temperature: float) -> list[float]:
            body = {"model": client._model, "prompt": prompt, "max_tokens": 1, "temperature": temperature,
                    "logprobs": 5, "seed": 0}
            out = self._retry(client.url, "POST /v1/completions", lambda: client._post("/v1/completions", body))
            entries = out["choices"][0]["logprobs"]["top_logprobs"][0]
            return sorted(entries.values(), reverse=True)

        one, half = top(1.0), top(0.5)
        degenerate = min(one, default=0.0) > -1e-3  # a certain model: both temperatures agree anyway
        if not degenerate and len(one) == len(half) and all(abs(a - b) < 1e-6 for a, b in zip(one, half)):
            raise ConfigError(f"{FIELD}.urls", f"the rollout server at {client.url} reports log-probs before "
                              "temperature; start it with --logprobs-mode processed_logprobs (python -m rlad_pl "
                              "serve does)")

    # ------------------------------------------------------------------------------------------------ weights
    #: generation runs in the servers' own processes, beside the trainer: ``max_off_policy_steps`` can overlap it
    overlaps = True

    def _push(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype, send: bool
              ) -> dict[str, float]:
        """Push ``weights()`` into every server (``send``: this process sends; FSDP ranks other than 0 only take
        part in the gathers). A server lost mid-push gets its transfer re-opened and the push retried."""
        from rlad_pl.rollout.server_client import ServerError

        if not self.clients:
            raise RuntimeError("ServerSampler weights pushed before setup")
        self._version += 1
        nbytes = buckets = tensors = 0
        for client in self.clients:
            def push(c=client):
                return c.push_weights(weights, dtype=dtype, bucket_bytes=self.sync_bucket_bytes,
                                      weight_version=str(self._version), is_sender=send)
            if not send:
                push()
                continue
            try:
                stats = push()
            except (ServerError, RuntimeError, *_LOST):  # lost mid-push, or restarted: re-open the transfer
                def recover(c=client):
                    c.close_transfer()
                    c.init_transfer(master_address=self.master_address, master_port=self.master_port,
                                    timeout_s=self.timeout)
                    return push()
                stats = self._retry(client.url, "a weight push", recover)
            nbytes += stats["bytes"]
            buckets += stats["buckets"]
            tensors += stats["tensors"]
        return {"weight_sync_bytes": float(nbytes), "weight_sync_buckets": float(buckets),
                "weight_sync_tensors": float(tensors)}

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        from rlad_pl.rollout.server_client import model_weights

        rank, world = rank_world()
        dtype = next(model.parameters()).dtype
        out = self._push(lambda: model_weights(model, self._tied), dtype, send=rank == 0)
        if world > 1:  # no rank samples before rank 0's push is complete; every rank logs what was pushed
            box = [out]
            torch.distributed.broadcast_object_list(box, src=0)
            out = box[0]
        return out

    @torch.no_grad()
    def snapshot(self, model: torch.nn.Module) -> Optional[list[tuple[str, torch.Tensor]]]:
        """The weights a push sends, gathered (FSDP2: every rank takes part) and copied to CPU on rank 0 (None on
        the other ranks), for ``load_snapshot`` to push later from a background thread."""
        from rlad_pl.rollout.gloo_transfer import materialize
        from rlad_pl.rollout.server_client import model_weights

        rank, _ = rank_world()
        dtype = next(model.parameters()).dtype
        named = [(n, materialize(t, dtype)) for n, t in model_weights(model, self._tied)]
        return [(n, t.clone()) for n, t in named] if rank == 0 else None

    def load_snapshot(self, snapshot: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Push a ``snapshot`` (rank 0's worker thread; no collective)."""
        dtype = snapshot[0][1].dtype if snapshot else torch.float32
        return self._push(lambda: iter(snapshot), dtype, send=True)

    # ------------------------------------------------------------------------------------------------ sampling
    def check_lengths(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        longest = max((len(p) for p in prompt_ids), default=0)
        if self.max_model_len is not None and longest + params.max_new_tokens > self.max_model_len:
            raise ConfigError("data.sampling.max_new_tokens", f"the longest prompt ({longest} tokens) + "
                              f"max_new_tokens ({params.max_new_tokens}) = {longest + params.max_new_tokens} exceeds "
                              f"the rollout server's max model length {self.max_model_len}; lower max_new_tokens or "
                              "data.max_prompt_length, or start the server with a larger --max-model-len")

    def _request(self, k: int, prompt: list[int], params: SamplingParams, seed: int) -> list[Any]:
        client = self.clients[k % len(self.clients)]
        greedy = params.temperature <= 0
        extra: dict[str, Any] = {}
        if self._allowed is not None:
            extra["allowed_token_ids"] = self._allowed
        return self._retry(client.url, "POST /v1/completions", lambda: client.completions(
            [prompt], n=params.n, temperature=0.0 if greedy else params.temperature, max_tokens=params.max_new_tokens,
            logprobs=0, seed=seed, top_p=1.0 if greedy else params.top_p,
            top_k=None if greedy or params.top_k <= 0 else params.top_k, model=client._model, extra=extra))

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        if not self.clients:
            raise RuntimeError("ServerSampler.generate called before setup")
        if params.temperature > 2.0:
            raise ConfigError("data.sampling.temperature", f"vLLM accepts temperatures in [0, 2], got "
                                                           f"{params.temperature}")
        self.check_lengths(prompt_ids, params)
        # prompt i's n samples use seeds base + i n .. (VLLMSampler's rule): the same seed gives the same samples
        # whichever rank asks, so a seed_per_prompt run samples the same on 1 or N processes
        base = _mix_seed(params.seed)
        workers = max(1, min(self.max_concurrency, len(prompt_ids)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda i: self._request(i, list(prompt_ids[i]), params,
                                                            (base + i * params.n) & 0x7FFFFFFF),
                                    range(len(prompt_ids))))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        completions, finished, logprobs = [], [], []
        for outs in results:
            for c in sorted(outs, key=lambda c: c.index):
                completions.append(list(c.token_ids))
                finished.append(c.finish_reason == "stop" or (eos is not None and bool(c.token_ids)
                                                              and c.token_ids[-1] == eos))
                logprobs.append(list(c.logprobs or []))
        return Generation(completions, finished, logprobs)

    def close(self) -> None:
        for client in self.clients:
            client.close_transfer()
        self.clients = []


def check_served_model(url: str, root: Optional[str], model: torch.nn.Module) -> None:
    """When the trainer can read the served folder (``root`` of ``/v1/models``): its architecture and the parameter
    names and shapes a push sends must be the student's; the first difference is one line."""
    import json
    from pathlib import Path

    if not root or not (Path(root) / "config.json").is_file():
        return  # a hub id or another machine's folder: the first push names what the server rejects
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlad_pl.rollout.server_client import model_weights

    field = f"{FIELD}.urls"
    served_arch = (json.loads((Path(root) / "config.json").read_text()).get("architectures") or [None])[0]
    student_arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if served_arch and student_arch and served_arch != student_arch:
        raise ConfigError(field, f"the rollout server at {url} serves a {served_arch} ({root}), the student is a "
                          f"{student_arch}; start the server on the student")
    cfg = AutoConfig.from_pretrained(root)
    with torch.device("meta"):
        served = AutoModelForCausalLM.from_config(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    want = {n: tuple(t.shape) for n, t in model_weights(served, tied)}
    for name, tensor in model_weights(model, bool(getattr(model.config, "tie_word_embeddings", False))):
        if name not in want:
            raise ConfigError(field, f"the rollout server at {url} ({root}) has no parameter {name} of the "
                              "student; start the server on the student's architecture")
        if tuple(tensor.shape) != want[name]:
            raise ConfigError(field, f"the rollout server at {url} ({root}) has {name} of shape {want[name]}, the "
                              f"student {tuple(tensor.shape)}; start the server on the student's architecture")


__all__ = ["ServerSampler", "check_served_model"]
