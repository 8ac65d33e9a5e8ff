# fedleak: `make demo` sets up and runs the demo; `make test` sets up and runs the test suite.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fedleak-installed
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: setup demo test bench clean fashion-mnist

setup: $(STAMP) fashion-mnist

# One resolver run over pinned versions; torch==2.13.0 is the local CPU wheel (never torchvision).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[all,dev]'
	$(VENV)/bin/pip check
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's package (nothing downloads at run time).
fashion-mnist:
	@test -f $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: setup
	$(VENV)/bin/fedleak demo --out out/demo
	@echo "open out/demo/report.html in a browser"

# two workers, a file's tests on one of them (the federation tests start Flower, Ray and client processes)
test: setup
	$(PY) -m pytest -n 2 --dist loadfile

bench: setup
	$(PY) benchmarks/bench_exclusivity.py

clean:
	rm -rf $(VENV) out .pytest_cache
