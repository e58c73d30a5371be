"""Refactor parity: the scalars a config logs in its first rollout batches, recorded once and compared after a change.

``python tests/parity.py record OUT.json [--root DIR]`` runs every ``configs/*_tiny*.yaml`` and the demo for
``EPOCHS`` rollout batches from the current checkout and writes ``{config: {tag: [[step, value], ...]}}``;
``tests/test_parity.py`` reruns them and compares the loss and reward tags with ``tests/data/parity_baseline.json``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from pathlib import Path

from rlad_pl.testing import runs

EPOCHS = 4
#: tags compared by the parity test: every loss, reward, accuracy, gradient norm and entropy the run logs
COMPARED = ("loss", "reward", "accuracy", "grad_norm", "entropy")


def parity_configs(repo: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(repo / "configs" / "*_tiny*.yaml"))) + ["demo.yaml"]


def run_config(repo: Path, config: str, root: str, epochs: int = EPOCHS) -> dict[str, list[list[float]]]:
    out = os.path.join(root, config.removesuffix(".yaml"))
    overrides = {"trainer.max_epochs": epochs, "export.dirpath": os.path.join(out, "export")}
    try:
        run = runs.run_fit(repo / "configs" / config, overrides, out, timeout=1800)
    except runs.FitError as e:
        raise RuntimeError(f"{config}: {e}") from None
    return {tag: [[float(step), float(value)] for step, value in points] for tag, points in run.scalars.items()}


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
