"""GPU check: bf16 FSDP2 training throughput and memory, the LoRA student, and an end-to-end CLI fit, in one JSON file.

    bash tools/gpu_check.sh                      # one GPU: ~0.6B Qwen3-shaped model, ~2-3 min, < 10 min worst case
    bash tools/gpu_check.sh --cpu --tiny         # CPU smoke mode: the same code paths on a tiny shape, < 60 s

``tools/gpu_check.sh`` installs missing pure-Python runtime dependencies from ``.gpu_wheels/`` first
(``tools/fetch_gpu_wheels.sh``); it needs no network and no vLLM. Results go to ``$OUT/gpu_check.json`` when ``OUT``
is set (the device machine's output folder), else ``runs/gpu_check/gpu_check.json`` (``--out`` overrides), with the
phases' output in ``gpu_check.log`` beside it. Each phase runs in its own subprocess under a timeout, and the JSON
is rewritten after each, so a phase that fails, runs out of memory or hangs costs only itself. This file is the
driver; the phases are in ``tools/gpu_check_phases.py``, the subprocess and TensorBoard helpers in
``rlad_pl.testing.runs``.

Phases (model: a random-init ``Qwen3ForCausalLM`` built locally from a ``Qwen3Config`` with Qwen3-0.6B's shape:
hidden 1,024, 28 layers, 16 query / 8 KV heads of 128, MLP 3,072, tied 151,936-token vocabulary, 0.60B parameters):

1. ``train``: full fine-tuning under Lightning's ``ModelParallelStrategy`` (FSDP2 via ``rlad_pl.models.distributed``,
   bf16 compute with fp32 master weights: ``MixedPrecisionPolicy``), gradient checkpointing, token NLL of the response
   positions of fixed random sequences. Steps alternate between the chunked LM head (``rlad_pl.core.logprobs``, as the
   module runs it) and an unchunked one (the ``[B, R, 151936]`` logits at once), so both are measured side by side
   on the same weights: tokens per second and peak ``torch.cuda.max_memory_allocated`` per step, warm-up excluded,
   and the largest log-prob difference of the two heads on the first batch.
2. ``lora``: the LoRA student (``rlad_pl.models.lora.apply_lora``, r 64 / alpha 128 on every projection) on the bf16
   base under the same strategy: the adapters must stay fp32 and the base bf16 (checked on the sharded parameters before
   and after training), the optimizer sees only adapters, first- and last-layer adapters get gradients (gradient
   checkpointing), the loss on a fixed batch decreases; peak memory against phase 1's full fine-tuning.
3. ``fit``: ``python -m rlad_pl fit`` through the real CLI (its entry point ``rlad_pl.cli.main``, called in the
   phase's process) on ``configs/trrd_tiny.yaml`` with overrides: TRRD with the Hugging Face sampler on the GPU,
   student and teacher the phase's model saved in bf16 with a local word-level tokenizer of exactly 151,936 ids,
   ``ModelParallelStrategy``, bf16, gradient checkpointing, 2 rollout batches and a validation; checks that it
   finishes and that ``hf_export`` holds a model ``transformers`` loads with the same parameter count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repository itself, not an installed rlad_pl (the device machine has none)
    sys.path.insert(0, str(REPO))
from gpu_check_phases import PHASES, Settings, run_phase, settings_for  # noqa: E402
from rlad_pl.testing.runs import package_versions, run_logged, write_json  # noqa: E402

#: per-phase timeout (seconds); the total is also capped by --budget
PHASE_TIMEOUT = {"train": 200, "lora": 140, "fit": 220}


def environment(s: Settings) -> dict[str, Any]:
    """Versions (from package metadata: the CPU smoke mode does not import torch here) and the GPU."""
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "cuda": None}
    env.update(package_versions(("torch", "lightning", "transformers", "peft", "jsonargparse", "omegaconf")))
    if s.device == "cuda":
        import torch

        p = torch.cuda.get_device_properties(0)
        env["cuda"] = torch.version.cuda
        env.update(device_name=p.name, device_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}")
    env["wheels_installed"] = [w for w in os.environ.get("GPU_CHECK_INSTALLED", "").split(",") if w]
    return env


def default_out() -> Path:
    base = os.environ.get("OUT")
    return Path(base) / "gpu_check.json" if base else REPO / "runs" / "gpu_check" / "gpu_check.json"


def derive(report: dict) -> None:
    """Cross-phase numbers: LoRA peak memory against full fine-tuning (same batch, chunked head)."""
    train, lora = report["phases"].get("train", {}), report["phases"].get("lora", {})
    full, lo = (train.get("chunked") or {}).get("peak_mem_gib"), lora.get("peak_mem_gib")
    lora["peak_mem_vs_full"] = lo / full if full and lo else None


def summary_lines(report: dict) -> list[str]:
    P = report["phases"]
    lines = [f"gpu_check ({report['mode']}, {report['wall_s']:.0f} s): " +
             ", ".join(f"{k} {v['status']}" for k, v in P.items())]

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)
    t = P.get("train", {})
    for mode in ("chunked", "unchunked") if t.get("status") == "ok" else ():
        m = t.get(mode) or {}
        lines.append(f"  train {mode:9s}: {f(m.get('tokens_per_s'), ',.0f')} tokens/s, peak "
                     f"{f(m.get('peak_mem_gib'), '.2f')} GiB, loss {f(m.get('loss_first'), '.3f')} -> "
                     f"{f(m.get('loss_last'), '.3f')}")
    lo = P.get("lora", {})
    if lo.get("status") == "ok":
        lines.append(f"  lora: adapters fp32 {lo['adapters_fp32']}, base bf16 {lo['base_bf16']}, loss "
                     f"{f(lo['loss_first'], '.3f')} -> {f(lo['loss_last'], '.3f')}, peak "
                     f"{f(lo['peak_mem_gib'], '.2f')} GiB ({f(lo.get('peak_mem_vs_full'), '.2f')}x full)")
    fi = P.get("fit", {})
    if fi.get("status") == "ok":
        lines.append(f"  fit: {fi['fit_s']:.0f} s, hf_export loads {fi['hf_export_loads']}")
    return lines


def drive(args) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    s = settings_for(args.cpu, args.tiny, str(workdir))
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device (torch.cuda.is_available() is False); --cpu --tiny runs the "
                  "CPU smoke mode", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    start = time.perf_counter()
    report: dict[str, Any] = {"schema": 1, "mode": f"{s.device}{'-tiny' if args.tiny else ''}",
                              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "settings": dataclasses.asdict(s), "model_shape": s.arch, "env": environment(s),
                              "phases": {}, "wall_s": 0.0}
    for name in args.phases:
        left = args.budget - (time.perf_counter() - start)
        timeout = min(PHASE_TIMEOUT[name], left)
        t0 = time.perf_counter()
        result: dict[str, Any] = {"status": "skipped", "reason": f"no time left in the --budget of {args.budget} s"}
        if timeout > 5:
            result = run_child(name, s, timeout, log)
        result["wall_s"] = time.perf_counter() - t0
        report["phases"][name] = result
        report["wall_s"] = time.perf_counter() - start
        derive(report)
        write_json(out, report)
    if not args.workdir:  # a fresh temp folder of ours: GBs of models, runs and exports on the full shape
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir_removed"] = True
        write_json(out, report)
    for line in summary_lines(report):
        print(line)
    print(f"gpu_check: wrote {out}")
    return 0 if all(p["status"] == "ok" for p in report["phases"].values()) else 1


def run_child(name: str, s: Settings, timeout: float, log: Path) -> dict[str, Any]:
    """Run phase ``name`` in a subprocess under ``timeout``; its output is appended to ``log``. Past the timeout the
    phase and anything it started (the fit's CLI process) are killed."""
    result_file = Path(s.workdir) / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--settings",
           json.dumps(dataclasses.asdict(s)), "--result", str(result_file)]
    done = run_logged(cmd, log, env={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}, cwd=REPO,
                      timeout=timeout, append=True, header=f"===== phase {name} (timeout {timeout:.0f} s)",
                      new_session=True)
    if done.timed_out:
        return {"status": "timeout", "reason": f"phase {name} ran past {timeout:.0f} s (see {log.name})"}
    if result_file.exists():
        return json.loads(result_file.read_text())
    return {"status": "failed", "reason": f"phase {name} exited {done.returncode} without a result (see {log.name})"}


def child(args) -> int:
    s = Settings(**json.loads(args.settings))
    try:
        result = {"status": "ok", **run_phase(args.phase, s)}
        rc = 0
    except Exception as e:  # noqa: BLE001 -- any failure is this phase's result, the other phases still run
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:400]
        result, rc = {"status": "failed", "reason": f"{type(e).__name__}: {first}"}, 1
    write_json(Path(args.result), json.loads(json.dumps(result, default=str, allow_nan=True)))
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (with --tiny: the smoke mode)")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape and batch (smoke mode)")
    ap.add_argument("--out", help="JSON result path (default $OUT/gpu_check.json, else runs/gpu_check/)")
    ap.add_argument("--workdir", help="scratch folder for models and runs, kept (default: a fresh temp folder, "
                                      "removed at the end)")
    ap.add_argument("--phases", type=lambda x: x.split(","), default=list(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all phases together (default 540)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"--phases: unknown phase(s) {', '.join(bad)} (expected a subset of {','.join(PHASES)})")
    if args.phase:
        return child(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
