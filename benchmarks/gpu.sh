#!/usr/bin/env bash
# The GPU speed check, one command, unattended: DTS against the plain diffusers pipeline, best-of-N and SMC at equal
# batch on Stable Diffusion 1.5, SDXL and SD 3 (their architectures with random weights, float16, nothing
# downloaded): guided NFE/s, peak memory, engine / UNet / VAE / reward shares, and the device noise draw against the
# old per-row path (with sync-free checks of randn_rows and the PhaseTimer). About 5 minutes on one H200, model
# construction included; a hard limit of 8 (GPU_BENCH_SECONDS) stops it, keeping the configs already finished.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/results/pipeline_speed_gpu_cuda.{json,png}
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#
# Needs torch with CUDA and diffusers; this repository is installed editable if it is not importable yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import dts_diffusers.pipelines" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
"$PYTHON" - <<'EOF'
import sys

import diffusers
import torch

if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, diffusers {diffusers.__version__}")
EOF

timeout --signal=INT "${GPU_BENCH_SECONDS:-480}" "$PYTHON" benchmarks/pipeline_speed.py \
    --device cuda --dtype float16 --config sd15 sdxl sd3 --name gpu "$@"
