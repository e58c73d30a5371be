"""Proof of the server weight push on CPU: a vLLM OpenAI server (its own process, ``--weight-transfer-config
'{"backend": "gloo"}'``) receives a trainer's weights through vLLM's RL HTTP API and the gloo backend
(``rlad_pl.rollout.gloo_transfer``, ``rlad_pl.rollout.server_client``).

Steps: copy ``rlad_pl/assets/demo-student`` to a temporary folder, start the server on it, load the same model in
this process (transformers, fp32), check the server's greedy completions equal the trainer's; perturb the trainer's
weights (Gaussian noise, fixed seed), check the greedy completions now differ; push (pause -> start -> buckets ->
finish -> prefix-cache reset -> resume) and check the server's greedy completions equal the trainer's again, token
for token, and its sampled tokens' log-probs (T=1, raw logprobs) equal the trainer's ``log_softmax`` within
``--atol``. Pushes again (one bucket and a small-bucket multi-bucket push) and prints seconds / bytes per push.

    python tools/server_weight_push_demo.py [--port 8765] [--pushes 3] [--keep-log]

Exit code 0 when every check passes. Keep it light: one server, a 130k-parameter model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "rlad_pl" / "assets" / "demo-student"
PROMPTS = ["77+46-46-73=", "3+4=", "12-5+8=", "9+9+9+9=", "55-17=", "1+2+3+4+5=", "98-9-8=", "40+2="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, log_path: Path, backend: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "128", "--kv-cache-memory-bytes", str(64 << 20), "--no-enable-chunked-prefill",
           "--weight-transfer-config", f'{{"backend": "{backend}"}}']
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    print("server:", "VLLM_SERVER_DEV_MODE=1", " ".join(cmd[1:]), flush=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=False)


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_tokens: int, eos: int) -> list[int]:
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


@torch.no_grad()
def hf_token_logprobs(model, prompt_ids: list[int], completion: list[int]) -> list[float]:
    ids = torch.tensor([list(prompt_ids) + list(completion)])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return [float(logp[n - 1 + i, t]) for i, t in enumerate(completion)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--pushes", type=int, default=3, help="timed full pushes after the checked one")
    ap.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian perturbation")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--keep-log", action="store_true", help="print the server log's tail at the end")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlad_pl.rollout.server_client import VLLMServerClient, model_weights

    torch.manual_seed(0)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    work = Path(tempfile.mkdtemp(prefix="rlad-server-push-"))
    model_dir = work / "model"
    shutil.copytree(MODEL, model_dir)
    port = args.port or free_port()
    log_path = work / "server.log"
    t_start = time.perf_counter()
    proc = start_server(model_dir, port, log_path, args.backend)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        prompts = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

        client = VLLMServerClient(f"http://127.0.0.1:{port}", timeout=120)
        client.wait_until_ready(timeout=300, proc=proc)
        print(f"server ready after {time.perf_counter() - t_start:.1f} s; models {client.models()}; "
              f"weight_info {client.weight_info()}; workers {client.world_size()}", flush=True)

        def server_greedy() -> list[list[int]]:
            return [c.token_ids for c in client.completions(prompts, n=1, temperature=0.0,
                                                            max_tokens=args.max_tokens, logprobs=None)]

        before = server_greedy()
        hf_before = [hf_greedy(model, p, args.max_tokens, eos) for p in prompts]
        check(before == hf_before, "before any push: server greedy == trainer greedy (same checkpoint)")
        print("  e.g.", PROMPTS[0], "->", tok.decode(before[0]), flush=True)

        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * args.noise)
        hf_after = [hf_greedy(model, p, args.max_tokens, eos) for p in prompts]
        differ = sum(a != b for a, b in zip(before, hf_after))
        check(differ > 0, f"perturbed trainer greedy differs from the server's on {differ}/{len(prompts)} prompts")
        check(server_greedy() == before, "server unchanged before the push")

        t0 = time.perf_counter()
        info = client.init_transfer(master_address="127.0.0.1")
        print(f"init_transfer: {time.perf_counter() - t0:.2f} s, init_info {info}", flush=True)

        stats = client.push_weights(model_weights(model), weight_version="step-1")
        print(f"push 1: {stats['seconds']:.3f} s, {stats['bytes']} bytes, {stats['buckets']} bucket(s), "
              f"{stats['tensors']} tensors", flush=True)
        nparams = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embedding counted once
        check(stats["bytes"] == nparams, f"bytes pushed == parameter bytes ({nparams})")
        check(client.weight_info().get("weight_version") == "step-1", "weight_info reports step-1")
        check(not client.is_paused(), "server resumed after the push")

        after = server_greedy()
        same = sum(a == b for a, b in zip(after, hf_after))
        check(after == hf_after, f"after push: server greedy == trainer greedy on {same}/{len(prompts)} prompts")
        print("  e.g.", PROMPTS[0], "->", tok.decode(after[0]), flush=True)

        sampled = client.completions(prompts, n=4, temperature=1.0, max_tokens=args.max_tokens, logprobs=0, seed=1)
        worst, ntok = 0.0, 0
        for c in sampled:
            ref = hf_token_logprobs(model, prompts[c.prompt_index], c.token_ids)
            assert c.logprobs is not None and len(c.logprobs) == len(ref)
            worst = max([worst] + [abs(a - b) for a, b in zip(c.logprobs, ref)])
            ntok += len(ref)
        check(worst <= args.atol, f"sampled-token log-probs (T=1, {len(sampled)} samples, {ntok} tokens): "
                                  f"max |server - trainer| = {worst:.2e} <= {args.atol:g}")
        reasons = sorted({c.finish_reason for c in sampled})
        print(f"  finish reasons: {reasons}", flush=True)

        # a second, different perturbation through many small buckets (the bucketed path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * args.noise)
        stats = client.push_weights(model_weights(model), bucket_bytes=64 << 10, weight_version="step-2")
        print(f"push 2 (64 KiB buckets): {stats['seconds']:.3f} s, {stats['bytes']} bytes, "
              f"{stats['buckets']} buckets", flush=True)
        check(stats["buckets"] > 1, "multi-bucket push used several buckets")
        hf_after2 = [hf_greedy(model, p, args.max_tokens, eos) for p in prompts]
        check(server_greedy() == hf_after2, "after the multi-bucket push: server greedy == trainer greedy")

        times = []
        for i in range(args.pushes):
            s = client.push_weights(model_weights(model), weight_version=f"step-{3 + i}")
            times.append(s["seconds"])
            print(f"timed push {i + 1}: {s['seconds']:.3f} s, {s['bytes']} bytes", flush=True)
        if times:
            print(f"median push: {sorted(times)[len(times) // 2]:.3f} s for {s['bytes']} bytes", flush=True)
        check(server_greedy() == hf_after2, "after the timed pushes: server greedy unchanged (same weights)")
        client.close_transfer(notify_server=True)
    finally:
        stop_server(proc)
        if args.keep_log or failures:
            print("---- server log tail ----")
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]))
        shutil.rmtree(work, ignore_errors=True)
    print("ALL CHECKS PASSED" if not failures else f"{len(failures)} CHECK(S) FAILED: {failures}", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
