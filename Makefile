# One place for set-up: the README, CI and developers all go through these targets.
PY := .venv/bin/python
# The canonical MNIST files beside the checkout (this workspace and CI), when they are there;
# elsewhere the data layer uses its cache, the bundled 1500 images or a checked download.
ifeq ($(ODEFLUX_DATA_DIR),)
ifneq ($(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz),)
export ODEFLUX_DATA_DIR := $(abspath ../shared/data/mnist)
endif
endif

.PHONY: setup setup-test setup-bench train test test-fast bench clean

setup:
	@scripts/setup.sh app

setup-test:
	@scripts/setup.sh test

setup-bench:
	@scripts/setup.sh test,bench

train: setup  ## the tutorial's run: 1500 MNIST images, 9 epochs, InterpolatingAdjoint
	$(PY) -m odeflux train

# Two workers (pytest-xdist), a file's tests on one: the 2-core machine the suite's budget is for.
test: setup-test  ## the test suite (slow end-to-end cases included)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup-test
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: setup-bench
	$(PY) -m benchmarks.run_all

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
