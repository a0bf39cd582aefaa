# One place for set-up: the README, CI and developers all go through these targets.
PY := .venv/bin/python
ODEFLUX_DATA_DIR ?= $(abspath ../shared/data/mnist)
export ODEFLUX_DATA_DIR

.PHONY: setup setup-test train test test-fast bench clean

setup:
	@scripts/setup.sh app

setup-test:
	@scripts/setup.sh test

train: setup  ## the tutorial's run: 1500 MNIST images, 9 epochs, InterpolatingAdjoint
	$(PY) -m odeflux train

test: setup-test  ## the test suite (slow end-to-end cases included)
	$(PY) -m pytest -q

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

bench: setup-test
	$(PY) -m benchmarks.run_all

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
