# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup browser clean

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-ci.txt -e '.[test,demo]'
	# LXT 2.1, the AttnLRP authors' code, as a test oracle run in a subprocess; its declared
	# dependencies (bitsandbytes, open_clip, accelerate) are not needed for what we run
	$(BIN)/pip install --quiet --no-deps lxt==2.1
	# zennit-crp 0.6.0, the CRP authors' code, as the concepts oracle: it pins torch < 2 and
	# numpy <= 1.23.5, which CondAttribution does not need
	$(BIN)/pip install --quiet --no-deps zennit-crp==0.6.0
	# Inseq 0.7.1 for relprop.integrations.inseq: its metadata pulls CUDA 11 wheels and a
	# typeguard<=2.13.3 pin that its code never imports; jaxtyping and treescope it imports
	$(BIN)/pip install --quiet --no-deps inseq==0.7.1 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
		treescope==0.1.10
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/relprop demo --out relprop-out

# The report-page test renders HTML in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| sudo sh -c 'apt-get update -qq && apt-get install -y -qq chromium'; }

# Two test processes (pytest-xdist), one thread each: most tests are small and run
# Python-bound on one core, so two processes use both cores of a 2-core machine. Whole
# modules go to one process (--dist loadscope), so a module's fixtures (a traced model,
# an oracle's subprocess run) are built once, not once per process.
test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks scripts examples
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=15

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/python benchmarks/bench_speed.py --markdown docs/benchmarks.md

clean:
	rm -rf $(VENV) relprop-out
