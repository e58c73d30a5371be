"""Weight pushes over NCCL into GPU vLLM servers (``ServerSampler(backend="nccl")``), through vLLM's own trainer-side
engine (``vllm.distributed.weight_transfer.nccl_engine.NCCLTrainerWeightTransferEngine``).

The server runs ``--weight-transfer-config '{"backend": "nccl"}'`` (``python -m rlad_pl serve`` passes the
config's ``data.sampler.init_args.backend``). vLLM's engine does the rendezvous (a ``TCPStore`` at
``master_address:master_port``, this trainer NCCL rank 0, the server's workers ranks 1..N) and each round
``/start_weight_update`` -> ``/update_weights`` concurrently with a packed NCCL broadcast -> ``/finish_weight_update``;
``VLLMServerClient`` pauses the server before and resets its prefix cache and resumes it after, as for gloo. This
module only adapts rlad_pl's weights to vLLM's ``WeightSource`` (checkpoint names, the wire dtype, DTensors
gathered, CPU snapshots moved to this trainer's GPU) and keeps the GPU index for pushes from a worker thread
(``data.max_off_policy_steps``).

Needs a CUDA GPU in the trainer and vLLM installed beside it. Not run on a GPU yet: no GPU was lent to the session
that built it; the CPU tests check the ``WeightSource`` against vLLM's own metadata/iteration check and the one-line
refusals.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

BACKEND = "nccl"


def weight_source(weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype | None,
                  device: torch.device | str | None = None):
    """vLLM's ``WeightSource`` over ``weights()`` (``(checkpoint name, tensor)`` pairs, re-iterable by calling it
    again): ``metadata()`` reads names, global shapes and the wire ``dtype`` without gathering; iteration gathers
    DTensors (``full_tensor()``, every rank in the same order), casts to ``dtype`` and moves to ``device``, and
    counts what it yielded (``sent_bytes``, ``sent_tensors``)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class _Source(WeightSource):
        sent_bytes = sent_tensors = 0

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, dtype or t.dtype, tuple(t.shape)) for name, t in weights()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            from rlad_pl.rollout.gloo_transfer import materialize

            for name, t in weights():
                t = materialize(t, dtype, device)
                self.sent_bytes += t.numel() * t.element_size()
                self.sent_tensors += 1
                yield name, t

    return _Source()


class NCCLWeightSender:
    """Trainer rank 0's end of one server's NCCL weight-transfer group (``open`` once, ``send`` per push)."""

    def __init__(self, master_address: str, master_port: int, *, num_workers: int) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl weight transfer needs a CUDA GPU in the trainer")
        self.master_address, self.master_port, self.num_workers = master_address, master_port, num_workers
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine: Any = None

    def open(self, client) -> dict[str, Any]:
        """Rendezvous with the server's workers (vLLM's ``trainer_init`` calls ``client``'s
        ``/init_weight_transfer_engine`` while it opens rank 0). Returns the trainer-side init info."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if not self.master_port:
            with socket.socket() as s:  # vLLM's rendezvous store listens here (as NCCL rank 0)
                s.bind(("", 0))
                self.master_port = s.getsockname()[1]
        info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                   world_size=self.num_workers + 1, rank=0)
        with torch.cuda.device(self.device):
            self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=client, source=weight_source(lambda: iter(()), None, self.device))
        return {"master_address": self.master_address, "master_port": self.master_port,
                "world_size": self.num_workers + 1}

    def send(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype | None) -> dict:
        """One round (start, update + broadcast, finish); the caller pauses and resumes the server around it."""
        if self.engine is None:
            raise RuntimeError("NCCLWeightSender.open() first")
        source = self.engine.source = weight_source(weights, dtype, self.device)
        with torch.cuda.device(self.device):  # also from the asynchronous pipeline's worker thread
            self.engine.send_weights()
        return {"bytes": source.sent_bytes, "buckets": 1, "tensors": source.sent_tensors}

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.engine.shutdown()
            finally:
                self.engine = None


__all__ = ["BACKEND", "NCCLWeightSender", "weight_source"]
