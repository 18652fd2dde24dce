#!/usr/bin/env bash
# Fetch, here, what the GPU machine lacks for bench/gpu_check.sh (it cannot reach a package registry), into
# .whl/ (ignored by git; the device call carries it: carry [".whl"]):
#   * wheels for its Python 3.12 on manylinux x86-64, --no-deps, pinned: the engine's mrcfile, starfile, emtable,
#     gemmi, umap-learn (+ pynndescent; numba and llvmlite are there), MDAnalysis (+ its needs), and cryoDRGN 4.3.1 with what its
#     train_vae imports and the machine lacks (igraph, texttable, nbformat and nbformat's needs);
#   * the cryoDRGN test data the tests read from ../shared/data/thirdparty/cryodrgn-tests (that folder beside the
#     checkout does not travel; gpu_check.sh links it from .whl/thirdparty there).
# What the machine has is listed in the device notes of the tool library (KINDS.md) and shared/docs/HOSTS.md.
#
#   bash bench/gpu_wheels.sh          # then, on the device machine: bash bench/gpu_check.sh (carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=.whl
LIMIT_MIB=${GPU_WHEELS_LIMIT_MIB:-50}   # the travelling tree may hold 64 MiB in all

WHEELS=(
  # the engine
  mrcfile==1.5.4            # 1.4.3 (the Scipion pin) calls ndarray.newbyteorder, gone in numpy 2 (the machine has 2.5)
  starfile==0.5.13
  emtable==0.0.14
  gemmi==0.7.5
  umap-learn==0.5.12
  pynndescent==0.7.0
  MDAnalysis==2.11.0        # reweight's trajectories (ProDy: no wheel for Python 3.12 here, a 35 MB sdist; see gpu_check.sh)
  GridDataFormats==1.2.0
  mmtf-python==1.1.3
  mda-xdrlib==0.2.0
  # cryoDRGN's train_vae, parse_pose_star, parse_ctf_star (healpy, plotly, jupyterlab... are not imported by them)
  cryodrgn==4.3.1
  igraph==1.0.0
  texttable==1.7.2
  nbformat==5.11.1
  fastjsonschema==2.22.3
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  jupyter_core==5.9.1
  traitlets==5.16.1
  platformdirs==4.14.9
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $n" >&2
  exit 1
fi

DATA=../shared/data/thirdparty/cryodrgn-tests
if [ -d "$DATA" ]; then
  rm -rf "$DEST/thirdparty"
  mkdir -p "$DEST/thirdparty"
  cp -r "$DATA" "$DEST/thirdparty/"
  chmod -R u+w "$DEST/thirdparty"
else
  echo "gpu_wheels: $DATA not found: the tests that read it will fail on the GPU machine" >&2
fi

ls -l "$DEST"/*.whl | awk '{printf "%9.2f MiB  %s\n", $5 / 1048576, $NF}'
total=$(du -sb "$DEST" | cut -f1)
printf 'gpu_wheels: %d wheels, %.1f MiB in %s (test data included)\n' "$n" "$(echo "$total / 1048576" | bc -l)" "$DEST"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_wheels: over ${LIMIT_MIB} MiB: the working tree must travel in 64 MiB" >&2
  exit 1
fi
