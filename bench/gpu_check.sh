#!/usr/bin/env bash
# The GPU check, one command on a machine lent a GPU (run from the repository root, within 8 minutes):
#   1. installs the wheels carried in .whl/ (bench/gpu_wheels.sh makes them here) into /tmp/site and links the
#      cryoDRGN test data where the tests look for it (../shared/data/thirdparty/cryodrgn-tests);
#   2. runs the engine's tests (tests/, and tests_gpu/: those that need a GPU, which CI lacks) on CUDA (device
#      auto = CUDA there), under a time budget, without the tests that need
#      Scipion or RELION's binaries (neither is on that machine; the lists are below);
#   3. runs bench/gpu_check.py: speed side by side with cryoDRGN 4.3.1 (train_vae at box 128 and 256, same
#      architecture and batch), the times of reconstruct and principal-volumes, peak GPU memory; it prints a
#      Markdown table for docs/benchmarks.md. For #17: train-vae's and principal-volumes' memory plans beside
#      their measured peaks, train-vae's time outside its epochs (start-up and outputs) and `cryohet --help`'s
#      time; the epoch times at batch 8 show what the trainer's per-step host syncs cost before.
# Outputs in $OUT (the device tool brings them back): gpu_check.md, gpu_check.json, gpu_check_logs.tar.gz,
# pytest.log, tests_summary.txt.
#
#   here:                 bash bench/gpu_wheels.sh
#   on the device:        run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Budgets (seconds, environment): GPU_CHECK_TOTAL_S (460) for everything, GPU_CHECK_PYTEST_S (170) for the tests.
# GPU_CHECK_ARGS: more arguments for bench/gpu_check.py (e.g. --cpu-smoke to try the whole script on a CPU machine);
# GPU_CHECK_SKIP_WHEELS=1: use the installed packages (the wheels are for the GPU machine's Python 3.12).
set -u
cd "$(dirname "$0")/.."
TOTAL=${GPU_CHECK_TOTAL_S:-460}
PYTEST_S=${GPU_CHECK_PYTEST_S:-170}
PY=${PYTHON:-python3}
export OUT=${OUT:-/tmp/cryohet_gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CRYOHET_NO_PROGRESS=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# ---- 1. carried wheels and test data
if [ "${GPU_CHECK_SKIP_WHEELS:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_check: no wheels installed from .whl/ (bash bench/gpu_wheels.sh, then carry .whl); using what is there"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DATA="$(cd .. && pwd)/shared/data/thirdparty/cryodrgn-tests"
if [ ! -e "$DATA" ] && [ -d .whl/thirdparty/cryodrgn-tests ]; then
  mkdir -p "$(dirname "$DATA")" && ln -s "$PWD/.whl/thirdparty/cryodrgn-tests" "$DATA"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "gpu_check: no nvidia-smi"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

# ---- 2. the engine's tests on CUDA
# Not here: Scipion (the plugin's tests) and RELION 3.1's binaries. The tests below run relion_project,
# relion_reconstruct, relion_star_handler, relion_image_handler or relion_pipeliner (directly or through a fixture
# or helper); CI runs them all. Found with: grep -n 'relion_[a-z_]*"' tests/*.py, and the fixtures/helpers using them.
IGNORE=(
  --ignore-glob='tests/test_scipion_*.py'
  --ignore=tests/test_relion_external.py      # every test behind a module fixture that needs relion_pipeliner
)
NEEDS_RELION=(
  tests/test_analysis_methods.py::test_select_by_cluster_writes_relion_subsets
  tests/test_classify.py::test_class_map_agrees_with_relion_reconstruct
  tests/test_analysis_methods.py::test_select_by_region_and_indices
  tests/test_geometry.py::test_projection_and_ctf_match_relion_project
  tests/test_io_mrc.py::test_write_map_roundtrip_and_relion_reads_it
  tests/test_io_mrc.py::test_write_stack_relion_reads_it
  tests/test_io_particles.py::test_relion_written_projections_load
  tests/test_io_particles.py::test_relion_reconstruct_reads_our_star
  tests/test_io_star.py::test_relion_star_handler_reads_our_star
  tests/test_reconstruct.py::test_reconstruct_matches_relion
  tests/test_reconstruct.py::test_reconstruct_downsampled_box_and_mask
  tests/test_reconstruct.py::test_reconstruct_bad_parameters
  tests/test_reconstruct.py::test_reconstruct_mask_of_another_box
  tests/test_reconstruct.py::test_reconstruct_nan_image_fails_cleanly
  tests/test_simulate.py::test_cli_simulate_then_relion_reconstruct
  tests/test_fit_modes.py::test_gaussian_images_match_relion_project
)
DESELECT=()
for t in "${NEEDS_RELION[@]}"; do DESELECT+=(--deselect "$t"); done
# ProDy has no wheel for the machine's Python 3.12 on this index (a 35 MB sdist): without it, the tests that compare
# with ProDy are left out here, said in the log; CI runs them. nma's GPU path (--solver torch) needs no ProDy.
if ! "$PY" -c "import prody" 2>/dev/null; then
  echo "gpu_check: ProDy is not installed: leaving out tests/test_nma.py, tests/test_io_atomic_model.py and the ProDy test of tests/test_train_atomic.py"
  IGNORE+=(--ignore=tests/test_nma.py --ignore=tests/test_io_atomic_model.py)
  DESELECT+=(--deselect tests/test_train_atomic.py::test_bonded_neighbours_of_protein_and_dna_as_prody_reads_them)
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${GPU_CHECK_WORKERS:-8}" --dist load)
fi
TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT=(--timeout "$((PYTEST_S - 20))")
fi
echo "gpu_check: engine tests on CUDA, at most ${PYTEST_S} s (${#NEEDS_RELION[@]} RELION tests deselected)"
# SIGINT at the budget (then KILL 20 s later); -v writes each test's result as it ends, so a run stopped at the
# budget still says what passed and failed
timeout -s INT -k 20 "$PYTEST_S" "$PY" -m pytest -v -rfE --durations=15 --continue-on-collection-errors \
  tests tests_gpu "${XDIST[@]}" "${TIMEOUT[@]}" "${IGNORE[@]}" "${DESELECT[@]}" >"$OUT/pytest.log" 2>&1
RC=$?
grep -E "(FAILED|ERROR)" "$OUT/pytest.log" | tail -n 40
tail -n 25 "$OUT/pytest.log"
SUMMARY=$(grep -E "^=+ .*[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s" "$OUT/pytest.log" | tail -n 1 \
  | sed 's/^=* *//; s/ *=*$//')
if [ -z "$SUMMARY" ]; then  # stopped before pytest's own summary: count the result lines
  SUMMARY=$(for w in PASSED FAILED ERROR SKIPPED; do
    printf '%s %s, ' "$(grep -cE "(^|[] ])${w}( |$)" "$OUT/pytest.log")" "${w,,}"; done | sed 's/, $//')
fi
case $RC in
  0) STATE="all passed" ;;
  124|137) STATE="stopped at the ${PYTEST_S} s budget" ;;
  *) STATE="exit $RC" ;;
esac
echo "${SUMMARY} (${STATE}; Scipion and RELION tests not run: neither is installed there)" >"$OUT/tests_summary.txt"
echo "gpu_check: tests: $(cat "$OUT/tests_summary.txt")"

# ---- 3. speed side by side with cryoDRGN, with what is left of the budget
LEFT=$((TOTAL - SECONDS - 10))
echo "gpu_check: speed check, ${LEFT} s left"
"$PY" bench/gpu_check.py --budget_s "$LEFT" --tests_summary "$OUT/tests_summary.txt" --work /tmp/cryohet_gpu_check \
  ${GPU_CHECK_ARGS:-}
echo "gpu_check: done in ${SECONDS} s"
