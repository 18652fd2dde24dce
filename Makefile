# Two commands do all set-up on a fresh machine:  make demo  (main job on the bundled default)  and  make test.
#
# Two Python environments (README, Set-up):
#   $(VENV)          the versions Scipion pins (numpy 1.26.1, ...): engine, Scipion plugin, RELION External job;
#   $(VENV_CURRENT)  the newest releases of the engine's dependencies (numpy 2.x): engine, RELION External job and
#                    RELION 5 (CCP-EM pipeliner) jobs.
# The dependencies are listed once, in setup.py (the Scipion pins in its `scipion` extra).
VENV ?= .venv
VENV_CURRENT ?= .venv-current
PY := $(VENV)/bin/python
# The newest torch here that is a CPU build (a local wheel); a bare `torch` pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The tests that drive Scipion (pyworkflow, pwem): only in $(VENV), left out of $(VENV_CURRENT) by name.
SCIPION_TESTS := tests/test_scipion_*.py
# The tests that drive RELION 5's pipeliner (ccpem-pipeliner needs numpy 2): only in $(VENV_CURRENT).
PIPELINER_TESTS := tests/test_pipeliner.py
# One line per test as it runs, the reasons of failures/errors/skips and the 25 slowest tests at the end.
PYTEST_ARGS ?= -v -rfEs --durations=25
export CRYOHET_NO_PROGRESS ?= 0

.PHONY: setup setup-current relion xvfb demo test lint

setup: $(VENV)/.installed relion xvfb

setup-current: $(VENV_CURRENT)/.installed relion

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[scipion,test]" "$(TORCH)"
	$(VENV)/bin/pip check
	touch $@

# --upgrade-strategy eager: an existing environment is brought to the newest releases too.
$(VENV_CURRENT)/.installed: setup.py
	python3 -m venv $(VENV_CURRENT)
	$(VENV_CURRENT)/bin/pip install -q --upgrade pip
	$(VENV_CURRENT)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test,relion5]" "$(TORCH)"
	$(VENV_CURRENT)/bin/pip check
	touch $@

# Debian's RELION 3.1.3: the tests compare against its binaries and drive its pipeliner.
relion:
	@command -v relion_reconstruct >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q relion; \
	  else echo "RELION is missing: run 'sudo apt-get install relion' (Debian/Ubuntu)" >&2; exit 1; fi; }

# Xvfb: tests/test_scipion_gui.py draws Scipion's Tk windows on a virtual display (it fails without one).
xvfb:
	@command -v Xvfb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q xvfb; \
	  else echo "Xvfb is missing: run 'sudo apt-get install xvfb' (Debian/Ubuntu)" >&2; exit 1; fi; }

demo: setup
	$(VENV)/bin/cryohet simulate --o demo_out/simulate --overwrite yes
	$(VENV)/bin/cryohet reconstruct --particles demo_out/simulate/particles.star --o demo_out/reconstruct --overwrite yes
	@echo; echo "Simulated particles and ground truth: demo_out/simulate/ (particles.star, maps/)"; \
	 echo "Reconstruction, half-maps, FSC:       demo_out/reconstruct/ (map.mrc, fsc.png, cryohet_run.json)"

# All but the pipeliner tests in $(VENV) and, at the same time (CI has two cores), all but the Scipion tests in
# $(VENV_CURRENT): the first prints as it runs, the second into a log printed when both are done; each has its own
# temporary folder, and make fails when either fails. The long accuracy tests marked one_stack run in the
# environment they name only (tests/conftest.py); the light tests of the same code run in both.
test: setup setup-current
	@tmp=$$(mktemp -d); \
	CRYOHET_NO_PROGRESS=1 CRYOHET_TEST_STACK=current $(VENV_CURRENT)/bin/pytest $(PYTEST_ARGS) --basetemp=$$tmp/current \
	  --ignore-glob='$(SCIPION_TESTS)' >$$tmp/current.log 2>&1 & current=$$!; \
	echo "== $(VENV): Scipion-pinned versions, all but $(PIPELINER_TESTS) (with $(VENV_CURRENT)'s suite beside it) =="; \
	rc=0; CRYOHET_NO_PROGRESS=1 CRYOHET_TEST_STACK=pinned $(VENV)/bin/pytest $(PYTEST_ARGS) --basetemp=$$tmp/pinned \
	  --ignore-glob='$(PIPELINER_TESTS)' || rc=$$?; \
	wait $$current || rc=$$?; \
	echo "== $(VENV_CURRENT): newest versions, all but $(SCIPION_TESTS) =="; \
	cat $$tmp/current.log; rm -rf $$tmp; exit $$rc

lint: setup
	$(VENV)/bin/ruff check cryohet cryohet_plugin tests bench bin/cryohet_external
