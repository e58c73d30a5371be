"""A gloo weight-transfer backend for vLLM servers on CPU (``--weight-transfer-config '{"backend": "gloo"}'``).

vLLM's RL HTTP API (``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
``/finish_weight_update``) moves weights through a *weight transfer engine* chosen by name. Its ``nccl`` engine needs
CUDA; this module is the same design over gloo, so a trainer can push its weights into a CPU vLLM server through the
same endpoints and the same worker code path (``Worker.update_weights`` -> engine -> ``model.load_weights`` inside a
layerwise reload session).

* **Worker side** (``GlooWeightTransferEngine``, loaded by vLLM through the ``vllm.general_plugins`` entry point
  ``rlad_pl_gloo = rlad_pl.rollout.gloo_transfer:register``): at ``/init_weight_transfer_engine`` each worker joins a
  *standalone* ``ProcessGroupGloo`` (its own ``TCPStore`` rendezvous, never the default process group: the trainer
  may be in a ``torch.distributed`` job of its own and vLLM's workers have theirs). At each ``/update_weights`` it
  receives one packed bucket (a flat ``uint8`` tensor, broadcast from rank 0) described by the request's
  ``{"names", "dtype_names", "shapes"}`` and loads it.
* **Trainer side** (``GlooWeightSender``, rank 0 of that group): opens the store, hands the workers their init info,
  joins the group, and broadcasts buckets. ``rlad_pl.rollout.server_client.VLLMServerClient`` drives it over HTTP.

Wire protocol (what both sides must agree on): the trainer cuts the stream into buckets; for each bucket it POSTs
``/update_weights`` with ``{"update_info": {"names": [...], "dtype_names": ["float32", ...], "shapes": [[...],
...]}}`` and, concurrently, broadcasts ``cat(t.view(-1).view(uint8) for t in bucket)`` from rank 0. The worker
allocates ``sum(numel * itemsize)`` bytes, receives, splits and views them back (``vllm``'s ``unpack_tensor`` layout).
vLLM's own packed NCCL producer/consumer are tied to CUDA streams, so the (tiny) packing is done here.

This module imports only ``torch`` at the top: vLLM imports it in every engine process at plugin load, and the trainer
side must not need vLLM at all. The vLLM-dependent classes are built on first access (module ``__getattr__``).
``register()`` never raises.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: the backend name in ``--weight-transfer-config '{"backend": "gloo"}'``; ``rlad_gloo`` is an alias that stays ours
#: should a future vLLM register its own ``gloo`` engine
BACKEND = "gloo"
BACKEND_ALIAS = "rlad_gloo"
DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 600.0
_ENGINE_CLASS_NAMES = ("GlooWeightTransferEngine", "GlooWeightTransferInitInfo", "GlooWeightTransferUpdateInfo")


# ------------------------------------------------------------------------------------------------ wire helpers


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (what ``getattr(torch, name)`` reads back)."""
    return str(dtype).split(".")[-1]


def materialize(tensor: torch.Tensor, dtype: torch.dtype | None = None,
                device: torch.device | str | None = "cpu") -> torch.Tensor:
    """A full, contiguous tensor on ``device`` (None: where it is) ready to send: DTensors (FSDP2) are gathered with
    ``full_tensor()`` (a collective: every trainer rank must call it in the same order), then cast to ``dtype``."""
    t = tensor.detach()
    full = getattr(t, "full_tensor", None)
    if callable(full):
        t = full()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return (t if device is None else t.to(device)).contiguous()


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Materialized buckets of about ``bucket_bytes`` (a bucket closes once it reaches the size, so one larger tensor
    makes a bucket of its own). Sizes are read before gathering (a DTensor's global shape), so every rank cuts the
    same buckets; each bucket's tensors are gathered together, in order, right before it is yielded."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        pending.append((name, t))
        size += t.numel() * (dtype or t.dtype).itemsize
        if size >= bucket_bytes:
            yield [(n, materialize(p, dtype)) for n, p in pending]
            pending, size = [], 0
    if pending:
        yield [(n, materialize(p, dtype)) for n, p in pending]


def bucket_update_info(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The ``update_info`` JSON of one bucket: ``{"names", "dtype_names", "shapes"}``."""
    return {
        "names": [n for n, _ in bucket],
        "dtype_names": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """One flat ``uint8`` CPU tensor holding the bucket's bytes in order."""
    flats = [t.contiguous().view(-1).view(torch.uint8) for _, t in bucket]
    return flats[0].clone() if len(flats) == 1 else torch.cat(flats)


def bucket_sizes(dtype_names: list[str], shapes: list[list[int]]) -> list[int]:
    """Byte size of each tensor of a bucket described by its update info."""
    return [math.prod(s) * getattr(torch, d).itemsize for d, s in zip(dtype_names, shapes)]


def unpack_bucket(buf: torch.Tensor, names: list[str], dtype_names: list[str],
                  shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buf`` (``pack_bucket``'s layout) as ``(name, tensor)`` pairs; a part whose byte offset is not a
    multiple of its element size (mixed dtypes: a bf16 tensor of odd length before a float32 one) is copied first,
    as a dtype view needs an aligned offset."""
    out = []
    for n, d, s, p in zip(names, dtype_names, shapes, buf.split(bucket_sizes(dtype_names, shapes))):
        dtype = getattr(torch, d)
        if p.storage_offset() % dtype.itemsize:
            p = p.clone()
        out.append((n, p.view(dtype).view(s)))
    return out


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (a UDP ``connect`` sends nothing); ``127.0.0.1`` for
    loopback hosts or when the route cannot be read. Gloo binds its pairs to this address."""
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"
    if ip.startswith("127.") or ip == "0.0.0.0":
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def new_gloo_group(store, rank: int, world_size: int, *, hostname: str, timeout_s: float, prefix: str):
    """A standalone ``ProcessGroupGloo`` over ``PrefixStore(prefix, store)``: not registered with
    ``torch.distributed`` (no default group needed, none touched). Blocks until all ``world_size`` ranks joined.
    ``GLOO_SOCKET_IFNAME`` picks the interface when set; otherwise gloo binds to ``hostname``."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    opts._devices = [ProcessGroupGloo.create_device(interface=iface) if iface
                     else ProcessGroupGloo.create_device(hostname=hostname)]
    return ProcessGroupGloo(PrefixStore(prefix, store), rank, world_size, opts)


def _close_group(group) -> None:
    for method in ("shutdown", "abort"):
        fn = getattr(group, method, None)
        if callable(fn):
            try:
                fn()
                return
            except Exception:  # pragma: no cover - best effort
                continue


def run_concurrently(remote: Callable[[], Any], local: Callable[[], Any], *, timeout_s: float,
                     what: str) -> tuple[Any, Any]:
    """Run ``remote`` (an HTTP call that blocks until the workers are done) and ``local`` (this rank's half of the
    same rendezvous / collective) at once, each in a daemon thread; return both results. The first exception is
    raised as soon as it happens: a failed HTTP call does not leave the caller hanging in a collective whose peers
    never arrive (the orphaned daemon thread ends with the process or the group's timeout)."""
    results: dict[str, Any] = {}
    errors: list[tuple[str, BaseException]] = []
    done = threading.Condition()

    def run(key: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            with done:
                errors.append((key, exc))
                done.notify_all()
            return
        with done:
            results[key] = value
            done.notify_all()

    threads = [threading.Thread(target=run, args=(k, f), name=f"rlad-gloo-{k}", daemon=True)
               for k, f in (("remote", remote), ("local", local))]
    for t in threads:
        t.start()
    with done:
        finished = done.wait_for(lambda: errors or len(results) == 2, timeout=timeout_s)
    if errors:
        key, exc = errors[0]
        raise RuntimeError(f"{what}: the {key} side failed: {exc!r}") from exc
    if not finished:
        raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s (remote done: {'remote' in results}, "
                           f"local done: {'local' in results})")
    return results["remote"], results["local"]


# ------------------------------------------------------------------------------------------------ trainer side


class GlooWeightSender:
    """Rank 0 of the trainer<->server gloo group: hosts the ``TCPStore`` and broadcasts buckets.

    ``open()`` binds the store (``master_port=0`` picks a free port) and returns the ``init_info`` for the server's
    ``/init_weight_transfer_engine``; ``connect()`` joins the group (it blocks until every worker has joined, so the
    HTTP init call must run concurrently: ``run_concurrently``); ``broadcast(bucket)`` sends one bucket (returns its
    bytes) once the server was told about it by ``/update_weights``. ``master_address`` must be this machine's address
    as the server sees it (``127.0.0.1`` when both run here).
    """

    def __init__(self, master_address: str = "127.0.0.1", master_port: int = 0, *, num_workers: int = 1,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.master_address = master_address
        self.master_port = master_port
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.world_size = num_workers + 1
        self.prefix = f"rlad_gloo/{uuid.uuid4().hex}"
        self.store = None
        self.group = None

    def open(self) -> dict[str, Any]:
        from torch.distributed import TCPStore

        if self.store is None:
            self.store = TCPStore(self.master_address, self.master_port, self.world_size, True,
                                  datetime.timedelta(seconds=self.timeout_s), wait_for_workers=False)
            self.master_port = self.store.port
        return {"master_address": self.master_address, "master_port": self.master_port,
                "world_size": self.world_size, "rank_offset": 1, "timeout_s": self.timeout_s,
                "store_prefix": self.prefix}

    def connect(self) -> None:
        if self.store is None:
            self.open()
        self.group = new_gloo_group(self.store, 0, self.world_size, hostname=self.master_address,
                                    timeout_s=self.timeout_s, prefix=self.prefix)

    def start_broadcast(self, bucket: list[tuple[str, torch.Tensor]]):
        """Enqueue the bucket's broadcast (gloo runs it on its own thread); returns ``(work, packed, nbytes)``:
        keep ``packed`` alive until ``work.wait()`` returned."""
        if self.group is None:
            raise RuntimeError("GlooWeightSender.connect() first (VLLMServerClient.init_transfer)")
        packed = pack_bucket(bucket)
        return self.group.broadcast(packed, 0), packed, packed.numel()

    def broadcast(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        work, _packed, nbytes = self.start_broadcast(bucket)
        work.wait()
        return nbytes

    def close(self) -> None:
        if self.group is not None:
            _close_group(self.group)
        self.group = None
        self.store = None


# ------------------------------------------------------------------------------------------------ worker side


@functools.cache
def _engine_classes() -> dict[str, type]:
    """Build the vLLM-side classes (imports vLLM: only on first access, which in a server happens when the worker
    creates its engine)."""
    from dataclasses import dataclass

    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass(kw_only=True)
    class GlooWeightTransferInitInfo(WeightTransferInitInfo):
        """The JSON of ``/init_weight_transfer_engine``'s ``init_info`` (``GlooWeightSender.open()``)."""

        master_address: str
        master_port: int
        world_size: int
        rank_offset: int = 1
        timeout_s: float = DEFAULT_TIMEOUT_S
        store_prefix: str = "rlad_gloo"

    @dataclass
    class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
        """The JSON of ``/update_weights``'s ``update_info``: one bucket (``bucket_update_info``)."""

        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

        def __post_init__(self) -> None:
            if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
                raise ValueError(f"names / dtype_names / shapes differ in length: {len(self.names)} / "
                                 f"{len(self.dtype_names)} / {len(self.shapes)}")
            for d in self.dtype_names:
                if not isinstance(getattr(torch, d, None), torch.dtype):
                    raise ValueError(f"unknown dtype name {d!r}")

    class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
        """vLLM worker side of the gloo backend: a standalone gloo group with the trainer (rank 0), one packed
        bucket per ``/update_weights``, loaded with ``model.load_weights`` inside a layerwise reload session (as the
        ``nccl`` engine does); the session's end also refreshes a tied ``lm_head``'s CPU kernel copy."""

        init_info_cls = GlooWeightTransferInitInfo
        update_info_cls = GlooWeightTransferUpdateInfo

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group = None
            self.store = None

        def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
            from torch.distributed import TCPStore

            self.shutdown()  # a trainer that re-initializes replaces the previous group
            pc = self.parallel_config
            rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
            timeout = datetime.timedelta(seconds=init_info.timeout_s)
            self.store = TCPStore(init_info.master_address, init_info.master_port, init_info.world_size, False,
                                  timeout)
            self.group = new_gloo_group(self.store, rank, init_info.world_size,
                                        hostname=local_address_towards(init_info.master_address),
                                        timeout_s=init_info.timeout_s, prefix=init_info.store_prefix)
            logger.info("gloo weight transfer: joined as rank %d of %d (trainer %s:%d)", rank,
                        init_info.world_size, init_info.master_address, init_info.master_port)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from rlad_pl.rollout.vllm_worker import _refresh_tied_head

            finalize_layerwise_reload(self.model, self.model_config)
            _refresh_tied_head(self.model)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # the base class ends with torch.accelerator.synchronize(), which raises on a CPU-only machine
            self.receive_weights(self.parse_update_info(update_info))
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()

        def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("gloo weight transfer not initialized: POST /init_weight_transfer_engine first")
            total = sum(bucket_sizes(update_info.dtype_names, update_info.shapes))
            buf = torch.empty(total, dtype=torch.uint8)  # gloo receives on the CPU; load_weights copies to device
            self.group.broadcast(buf, 0).wait()
            weights = unpack_bucket(buf, update_info.names, update_info.dtype_names, update_info.shapes)
            try:
                from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
            except ImportError:  # pragma: no cover - older vLLM
                import contextlib

                disable_mtp_completeness_check = contextlib.nullcontext
            with disable_mtp_completeness_check():
                self.model.load_weights(weights)

        def shutdown(self) -> None:
            if self.group is not None:
                _close_group(self.group)
            self.group = None
            self.store = None

    for cls in (GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo, GlooWeightTransferEngine):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return {c.__name__: c for c in (GlooWeightTransferEngine, GlooWeightTransferInitInfo,
                                    GlooWeightTransferUpdateInfo)}


def __getattr__(name: str):
    if name in _ENGINE_CLASS_NAMES:
        return _engine_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """vLLM ``general_plugins`` entry point: register ``GlooWeightTransferEngine`` as the ``gloo`` (and
    ``rlad_gloo``) weight transfer backend, lazily (the class is imported when a worker creates its engine). Safe to
    call any number of times; never raises (a failing plugin would break every vLLM engine in the process)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except Exception as exc:  # noqa: BLE001 - a vLLM without weight transfer: nothing to register
        logger.debug("rlad_pl gloo weight transfer not registered: %r", exc)
        return
    for name in (BACKEND, BACKEND_ALIAS):
        try:
            registry = getattr(WeightTransferEngineFactory, "_registry", {})
            if name in registry:
                continue  # ours from an earlier call, or another package's (then "rlad_gloo" still reaches ours)
            WeightTransferEngineFactory.register_engine(name, __name__, "GlooWeightTransferEngine")
        except ValueError:
            continue  # registered meanwhile
        except Exception as exc:  # noqa: BLE001
            logger.warning("rlad_pl gloo weight transfer: could not register %r: %r", name, exc)


__all__ = [
    "BACKEND",
    "BACKEND_ALIAS",
    "GlooWeightSender",
    "bucket_update_info",
    "iter_buckets",
    "materialize",
    "new_gloo_group",
    "pack_bucket",
    "register",
    "run_concurrently",
    "unpack_bucket",
]
