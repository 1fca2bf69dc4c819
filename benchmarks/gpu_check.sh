#!/usr/bin/env bash
# The prepared GPU check (issue 13): imgvec on a GPU through Keras' JAX and PyTorch backends.
#
#   benchmarks/gpu_check.sh --prepare   here (with TensorFlow): download the wheels the GPU machine lacks
#                                       (keras and its small dependencies, faiss-cpu; Python 3.12, x86_64) into
#                                       gpu-wheels/ and compute the CPU reference rows, gpu-wheels/reference.npz
#   benchmarks/gpu_check.sh             there (PyTorch, JAX, h5py, scikit-learn, typer, Pillow; no TensorFlow,
#                                       Keras, FAISS or network): install what is missing from gpu-wheels/, run
#                                       benchmarks/gpu_check.py, write $OUT/gpu_check.json (or benchmarks/out/)
#   benchmarks/gpu_check.sh --dry       the same on the CPU with a tiny set (make test runs it)
#
# imgvec itself runs from this tree's src/. Installing is skipped when keras and faiss are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=gpu-wheels
MODE=${1:-run}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = --prepare ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    $PY -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --dest "$WHEELS" \
        keras==3.15.1 faiss-cpu absl-py namex optree rich markdown-it-py mdurl pygments packaging typing-extensions
    git rev-parse HEAD > "$WHEELS/COMMIT"
    $PY benchmarks/gpu_check.py reference "$WHEELS/reference.npz"
    du -sh "$WHEELS"
    exit 0
fi

start=$(date +%s)
if ! $PY -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('keras') and u.find_spec('faiss')))"; then
    # --target: nothing installed on the machine is touched; --no-deps: what is there already (numpy,
    # ml_dtypes, h5py, ...) is used as it is.
    $PY -m pip install --quiet --no-index --no-deps --target "$WHEELS/site" "$WHEELS"/*.whl
    export PYTHONPATH="$PWD/$WHEELS/site:$PYTHONPATH"
fi
$PY - <<'PY'
from importlib import metadata
found = []
for dist in ("keras", "faiss-cpu", "jax", "torch"):  # a backend that is absent is reported by the run itself
    try:
        found.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        found.append(f"{dist} absent")
print(*found)
PY
echo "gpu_check: ready after $(( $(date +%s) - start )) s"

out_dir=${OUT:-benchmarks/out}
mkdir -p "$out_dir"
if [ "$MODE" = --dry ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    $PY benchmarks/gpu_check.py reference "$work/reference.npz" --dry  # TensorFlow here, as --prepare does
    $PY benchmarks/gpu_check.py run "$work/reference.npz" "$out_dir/gpu_check_dry.json" --dry
else
    $PY benchmarks/gpu_check.py run "$WHEELS/reference.npz" "$out_dir/gpu_check.json"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s"
