# The README's two commands: `make demo` (main job) and `make test` (tests).
# Each installs what it needs itself.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= out/demo

.PHONY: demo test bench install install-test data

install:
	$(PIP) install -q -e ".[examples]"

# The suite runs once per Keras backend. torch==2.13.0 is the CPU build
# served from this machine's disk; a plain `torch` would pull a CUDA build.
BACKENDS ?= tensorflow jax torch

# tf_keras must match the installed TensorFlow's minor version, or pip would
# replace TensorFlow with the version that the newest tf_keras wants.
install-test: install
	$(PIP) install -q -e ".[test,jax]" "torch==2.13.0"
	$(PIP) install -q tensorflow-model-optimization \
	  "tf_keras==$$($(PYTHON) -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))').*"

# Real Fashion-MNIST for machines without network access to tfds (Debian package).
data:
	@[ -d $(FASHION_MNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: install data
	$(PYTHON) examples/reproduce.py --quick --output_dir $(DEMO_DIR)

test: install-test data text-data
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend"; \
	  KERAS_BACKEND=$$backend $(PYTHON) -m pytest -q --durations=10; \
	done

bench: install
	$(PIP) install -q -e ".[jax]" "torch==2.13.0"
	@for backend in $(BACKENDS); do $(PYTHON) benchmarks/step_time.py --backend $$backend; \
	  $(PYTHON) benchmarks/mask_cost.py --backend $$backend; done

# Offline English prose for examples/char_lm.py: the King James Bible
# (Debian's bible-kjv: the `bible` decoder, pulling in bible-kjv-text's
# /usr/lib/bible.data); see examples/text_data.py.
.PHONY: text-data
text-data:
	@{ command -v bible >/dev/null && [ -f /usr/lib/bible.data ]; } || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bible-kjv; }
