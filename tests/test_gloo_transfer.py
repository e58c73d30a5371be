"""The gloo weight-transfer backend (``rlad_pl.rollout.gloo_transfer``) and the server client.

Fast tier: the bucket wire format (pack / unpack round trip over mixed dtypes and shapes, bucket boundaries), the
failure-first concurrency helper, and that the module imports torch only. ``distributed``: the trainer's
``GlooWeightSender`` against a worker stand-in in another process (the engine's receive path without vLLM). ``vllm``
(+ ``slow``): ``tools/server_weight_push_demo.py`` end to end against a real CPU vLLM server (about a minute).
"""

from __future__ import annotations

import datetime
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlad_pl.rollout.gloo_transfer import (
    GlooWeightSender,
    bucket_update_info,
    iter_buckets,
    new_gloo_group,
    pack_bucket,
    run_concurrently,
    unpack_bucket,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(3, 5, generator=g)), ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c.scale", torch.tensor(2.5)), ("d.ids", torch.arange(6, dtype=torch.int64).view(2, 3)),
            ("e.t", torch.randn(4, 6, generator=g).t())]  # a non-contiguous view


def test_pack_unpack_round_trip():
    bucket = [(n, t.contiguous()) for n, t in _named()]
    info = bucket_update_info(bucket)
    assert info["dtype_names"] == ["float32", "bfloat16", "float32", "int64", "float32"]
    assert info["shapes"] == [[3, 5], [7], [], [2, 3], [6, 4]]
    buf = pack_bucket(bucket)
    assert buf.dtype == torch.uint8 and buf.numel() == sum(t.numel() * t.element_size() for _, t in bucket)
    out = unpack_bucket(buf, **info)
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, a), (_, b) in zip(bucket, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_buckets_close_at_the_size_and_cast():
    named = [(f"p{i}", torch.ones(10)) for i in range(5)]  # 40 bytes each in fp32
    sizes = [len(b) for b in iter_buckets(named, bucket_bytes=80)]
    assert sizes == [2, 2, 1]
    buckets = list(iter_buckets(named, bucket_bytes=40, dtype=torch.float16))  # 20 bytes each once cast
    assert [len(b) for b in buckets] == [2, 2, 1] and buckets[0][0][1].dtype == torch.float16
    assert [len(b) for b in iter_buckets(_named(), bucket_bytes=1 << 30)] == [5]
    (one,) = iter_buckets([("t", torch.randn(4, 6).t())], 1 << 20)
    assert one[0][1].is_contiguous()


def test_run_concurrently_raises_the_first_failure_without_waiting():
    def boom():
        raise ValueError("remote said no")

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="remote side failed.*remote said no"):
        run_concurrently(boom, lambda: time.sleep(30), timeout_s=60, what="x")
    assert time.perf_counter() - t0 < 5
    assert run_concurrently(lambda: 1, lambda: 2, timeout_s=5, what="y") == (1, 2)
    with pytest.raises(TimeoutError):
        run_concurrently(lambda: time.sleep(5), lambda: 2, timeout_s=0.2, what="z")


def test_plugin_module_imports_torch_only():
    code = ("import sys, rlad_pl.rollout.gloo_transfer as g, rlad_pl.rollout.server_client; "
            "print(sorted(m for m in ('vllm', 'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _fake_worker(info: dict, updates, results) -> None:
    """What ``GlooWeightTransferEngine`` does, without vLLM: join the group, receive one bucket per update."""
    from torch.distributed import TCPStore

    from rlad_pl.rollout.gloo_transfer import bucket_sizes

    store = TCPStore(info["master_address"], info["master_port"], info["world_size"], False,
                     datetime.timedelta(seconds=60))
    group = new_gloo_group(store, 1, info["world_size"], hostname="127.0.0.1", timeout_s=60,
                           prefix=info["store_prefix"])
    while (update := updates.get(timeout=60)) is not None:
        buf = torch.empty(sum(bucket_sizes(update["dtype_names"], update["shapes"])), dtype=torch.uint8)
        group.broadcast(buf, 0).wait()
        results.put([(n, t.clone()) for n, t in unpack_bucket(buf, **update)])


@pytest.mark.distributed
def test_sender_broadcasts_buckets_to_a_worker_process():
    ctx = mp.get_context("spawn")
    updates, results = ctx.Queue(), ctx.Queue()
    sender = GlooWeightSender("127.0.0.1", 0, num_workers=1, timeout_s=60)
    info = sender.open()
    proc = ctx.Process(target=_fake_worker, args=(info, updates, results), daemon=True)
    proc.start()
    try:
        sender.connect()
        got = []
        for bucket in iter_buckets(_named(), bucket_bytes=64):
            updates.put(bucket_update_info(bucket))
            assert sender.broadcast(bucket) == sum(t.numel() * t.element_size() for _, t in bucket)
            got += results.get(timeout=60)
        updates.put(None)
        proc.join(30)
        assert proc.exitcode == 0
        assert [n for n, _ in got] == [n for n, _ in _named()]
        for (_, a), (_, b) in zip(_named(), got):
            assert torch.equal(a, b) and a.dtype == b.dtype
    finally:
        sender.close()
        if proc.is_alive():
            proc.kill()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_register_is_idempotent():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rlad_pl.rollout import gloo_transfer

    gloo_transfer.register()
    gloo_transfer.register()
    for name in ("gloo", "rlad_gloo"):
        assert WeightTransferEngineFactory._registry[name]() is gloo_transfer.GlooWeightTransferEngine


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_server_weight_push_demo():
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "server_weight_push_demo.py"), "--pushes", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "ALL CHECKS PASSED" in out.stdout
