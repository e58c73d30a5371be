"""Refactor parity: the scalars a config logs in its first rollout batches, recorded once and compared after a change.

``python tests/parity.py record OUT.json [--root DIR]`` runs every ``configs/*_tiny*.yaml`` and the demo for
``EPOCHS`` rollout batches from the current checkout and writes ``{config: {tag: [[step, value], ...]}}``;
``tests/test_parity.py`` reruns them and compares the loss and reward tags with ``tests/data/parity_baseline.json``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

EPOCHS = 4
#: tags compared by the parity test: every loss, reward, accuracy, gradient norm and entropy the run logs
COMPARED = ("loss", "reward", "accuracy", "grad_norm", "entropy")


def parity_configs(repo: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(repo / "configs" / "*_tiny*.yaml"))) + ["demo.yaml"]


def read_scalars(logdir: str) -> dict[str, list[list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[list[float]]] = {}
    for ev in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(ev, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend([float(e.step), float(e.value)] for e in acc.Scalars(tag))
    return out


def run_config(repo: Path, config: str, root: str, epochs: int = EPOCHS) -> dict[str, list[list[float]]]:
    out = os.path.join(root, config.removesuffix(".yaml"))
    cmd = [sys.executable, "-m", "rlad_pl", "fit", "--config", f"configs/{config}", "--trainer.max_epochs",
           str(epochs), "--trainer.default_root_dir", out, "--export.dirpath", os.path.join(out, "export")]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{config}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return read_scalars(out)


def compared(scalars: dict) -> dict:
    return {k: v for k, v in scalars.items() if any(w in k for w in COMPARED) and not k.startswith("timing/")}


if __name__ == "__main__":
    repo = Path.cwd()
    dest = Path(sys.argv[2])
    only = sys.argv[3:] or parity_configs(repo)
    result = json.loads(dest.read_text()) if dest.exists() else {}
    with tempfile.TemporaryDirectory() as root:
        for cfg in only:
            result[cfg] = run_config(repo, cfg, root)
            dest.write_text(json.dumps(result, indent=0, sort_keys=True))
            print(cfg, len(result[cfg]), "tags", flush=True)
