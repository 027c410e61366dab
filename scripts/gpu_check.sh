#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md): installs what this machine's Python lacks from .whl/,
# archives, serves and measures on cuda:0, and writes gpu_check.md and gpu_check.json to REPORT_DIR.
#
#   scripts/gpu_check.sh [--dry-run] [REPORT_DIR]      (default REPORT_DIR: gpu-report)
#
# --dry-run: the same steps on the CPU with the tiniest models, the CUDA-only ones skipped and listed.
# Python: $GPU_CHECK_PYTHON if set; else, in a dry run, the project's .venv when there is one; else python3
# (on a GPU machine: the python3 that has its CUDA torch).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=""
report="gpu-report"
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run="--dry-run" ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) report="$arg" ;;
    esac
done

python="${GPU_CHECK_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -n "$dry_run" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
command -v "$python" >/dev/null 2>&1 || { echo "gpu_check.sh: no $python here" >&2; exit 1; }

exec "$python" scripts/gpu_check.py $dry_run "$report"
