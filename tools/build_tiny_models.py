"""Build the tiny randomly initialised char-level models shipped in ``rlad_pl/assets`` (tests, smoke configs).

    python tools/build_tiny_models.py            # writes rlad_pl/assets/tiny-student and rlad_pl/assets/tiny-teacher

Both share one char-level tokenizer (``rlad_pl.models.loading.build_char_tokenizer``); the teacher is wider. Attention
head size is 32 in both (vLLM's CPU build supports head sizes 32, 64, 80, ...), so the vLLM configs run them.
Deterministic (fixed seeds); runs in seconds on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlad_pl.testing.builders import save_tiny_model

ASSETS = Path(__file__).resolve().parents[1] / "rlad_pl" / "assets"

SPECS = {
    "tiny-student": dict(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, seed=0),
    "tiny-teacher": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    for name, arch in SPECS.items():
        path = save_tiny_model(args.out / name, **arch)
        n = sum(p.stat().st_size for p in path.iterdir())
        print(f"{path}: {n / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
