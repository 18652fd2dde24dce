# Two commands do all set-up on a fresh machine:  make demo  (main job on the bundled default)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
export CRYOHET_NO_PROGRESS ?= 0

.PHONY: setup relion demo test lint

setup: $(VENV)/.installed relion

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[scipion,test]"
	$(VENV)/bin/pip check
	touch $@

# Debian's RELION 3.1.3: the tests compare against its binaries and drive its pipeliner.
relion:
	@command -v relion_reconstruct >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q relion; \
	  else echo "RELION is missing: run 'sudo apt-get install relion' (Debian/Ubuntu)" >&2; exit 1; fi; }

demo: setup
	$(VENV)/bin/cryohet simulate --o demo_out/simulate
	$(VENV)/bin/cryohet reconstruct --particles demo_out/simulate/particles.star --o demo_out/reconstruct
	@echo; echo "Simulated particles and ground truth: demo_out/simulate/ (particles.star, maps/)"; \
	 echo "Reconstruction, half-maps, FSC:       demo_out/reconstruct/ (map.mrc, fsc.png, cryohet_run.json)"

test: setup
	CRYOHET_NO_PROGRESS=1 $(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check cryohet cryohet_plugin tests bench bin/cryohet_external
