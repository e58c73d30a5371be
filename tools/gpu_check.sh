#!/usr/bin/env bash
# GPU check (issue #15 item 4, issue #13's GPU part): bf16 FSDP2 training of a ~0.6B Qwen3-shaped model (chunked vs
# unchunked LM head at a 151,936 vocabulary), the LoRA student in bf16 with fp32 adapters, and an end-to-end
# `python -m rlad_pl fit` with the HF sampler; results in one JSON file ($OUT/gpu_check.json when OUT is set).
#
#   bash tools/gpu_check.sh                  # on one GPU (~2-3 min; every phase time-boxed, < 10 min in all)
#   bash tools/gpu_check.sh --cpu --tiny     # CPU smoke mode (< 60 s), tests/test_gpu_check.py
#   bash tools/gpu_check.sh --help           # options of tools/gpu_check.py
#
# With this workplace's device `run` tool: `bash tools/fetch_gpu_wheels.sh` here once, then one call
#   run(command="bash tools/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=600)
# (the phases share a 540 s budget, --budget); gpu_check.json and gpu_check.log come back from $OUT.
#
# Needs torch, lightning, transformers, peft and the repository, no network, no vLLM: the pure-Python runtime
# dependencies a torch + lightning + transformers + peft image lacks (the CLI's jsonargparse[signatures,omegaconf])
# are installed, only when their import fails, from wheels in $GPU_CHECK_WHEELS (default .gpu_wheels/, made by
# tools/fetch_gpu_wheels.sh; carry it to the device machine) into $GPU_CHECK_SITE (default /tmp/gpu_check_site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
# import name -> distribution name; the CLI's parser stack (reasoning-gym / math-verify are not needed: the check's
# tasks are CharFrequencyTask and random tokens)
CARRIED="!jsonargparse:jsonargparse !omegaconf:omegaconf !docstring_parser:docstring-parser
         !typeshed_client:typeshed-client peft:peft"
# what cannot travel as a small wheel: the image must have it
REQUIRED="torch lightning transformers tensorboard torchmetrics safetensors tokenizers yaml"

missing_of() {  # the distributions (or modules) of "$@" (import:dist pairs or module names) that are missing:
  # a module marked '!' is imported (the small parser packages: a broken install shows too), the others only
  # looked up (importing torch / transformers / peft here would cost seconds)
  "$PY" - "$@" <<'PYEOF'
import importlib, importlib.util, sys
for item in sys.argv[1:]:
    mod, _, dist = item.partition(":")
    try:
        if mod.startswith("!"):
            mod = mod[1:]
            importlib.import_module(mod)
        elif importlib.util.find_spec(mod) is None:
            raise ImportError(mod)
    except ImportError:
        print(dist or mod)
PYEOF
}

lacking=$(missing_of $REQUIRED | tr '\n' ' ')
if [ -n "${lacking// /}" ]; then
  echo "gpu_check: error: this Python ($PY) lacks $lacking; the check needs an image with torch, lightning," \
       "transformers, tensorboard and torchmetrics" >&2
  exit 2
fi
missing=$(missing_of $CARRIED | tr '\n' ' ' | sed 's/ *$//')
installed=""
if [ -n "${missing// /}" ]; then
  wheels=()
  for dist in $missing; do
    found=$(ls "$WHEELS"/"${dist//-/_}"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$found" ]; then
      echo "gpu_check: error: $dist is not importable and $WHEELS/ has no wheel for it (missing: $missing); run" \
           "'bash tools/fetch_gpu_wheels.sh' on a machine with PyPI access and carry $WHEELS/ (run tool:" \
           "carry [\"$WHEELS\"])" >&2
      exit 2
    fi
    wheels+=("$found")
  done
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  installed=$(basename -a "${wheels[@]}" | tr '\n' ',' | sed 's/,$//')
  echo "gpu_check: installed from $WHEELS/: $installed"
  still=$(missing_of $CARRIED | tr '\n' ' ')
  if [ -n "${still// /}" ]; then
    echo "gpu_check: error: still not importable after installing the wheels: $still" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_INSTALLED="$installed" PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$@"
