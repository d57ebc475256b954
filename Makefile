# discrim_jax: `make run` trains the offline default, `make test` runs the tests.
# Both do all set-up on a fresh Debian/Ubuntu machine with python3 and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The library with the training app's extra is what `make run` needs; `make test` adds the test, PyTorch-reference and
# benchmark extras. ACCEL=cuda12 (NVIDIA GPUs) or ACCEL=tpu (Cloud TPU VMs)
# also installs JAX for that accelerator: `make run ACCEL=cuda12`.
ACCEL ?=
comma := ,
EXTRAS := [app$(if $(ACCEL),$(comma)$(ACCEL),)]
TEST_EXTRAS := [app,test,pretrained,bench$(if $(ACCEL),$(comma)$(ACCEL),)]
STAMP := $(VENV)/.installed-run$(ACCEL)
TEST_STAMP := $(VENV)/.installed-test$(ACCEL)
# uv installs the same requirements as pip, fetching and unpacking wheels in
# parallel, from where pip's configuration says (tools/uv_as_pip.py: indexes,
# find-links, constraints); pip where uv cannot be had or fails. A fresh `make
# setup-test`, empty caches, 2-core AMD EPYC: 89 and 104 s against 165, 186 and
# 180 s with pip (docs/speed.md).
UV_INSTALL := $(BIN)/python tools/uv_as_pip.py $(BIN)/uv pip install -q \
  --python $(BIN)/python
# Bytecode for the ~7,000 modules the app and the tests load, written by
# importing them two processes at once (tools/write_bytecode.py), rather than
# uv's --compile-bytecode of all ~23,000 in the environment. With this and an
# unreachable PyTorch index passed by at once (below), a fresh `make
# setup-test` took 92 and 113 s against 118 and 141 s before, alternated,
# empty caches, 2-core AMD EPYC (docs/speed.md).
APP_MODULES := tensorflow,tensorflow_datasets,clu.metric_writers,grain \
  jax,flax.linen,optax,orbax.checkpoint,scipy.stats,statsmodels.stats.multitest,matplotlib.pyplot,PIL.Image,ml_collections,absl.app,tqdm
TEST_MODULES := torch,torchvision,transformers.models.cvt.modeling_cvt,safetensors \
  pytest,xdist,chex,nbclient,ipykernel
install = { [ -x $(BIN)/uv ] && $(UV_INSTALL) $(1); } || $(BIN)/pip install -q $(1)
# PyTorch's own index of CPU-only wheels (about 1 GB installed, against 5 GB
# for the default build with CUDA libraries); used where it can be reached.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Where its name does not resolve (no DNS for it), the index is passed by at
# once: uv retries such a name for ~9 s before it gives up.
TORCH_INDEX_RESOLVES := import socket, sys, urllib.parse; \
  socket.getaddrinfo(urllib.parse.urlsplit(sys.argv[1]).hostname, 443)
# Debian's Fashion-MNIST: system-wide (apt-get install) or unpacked without root.
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FMNIST_CACHE := $(HOME)/.cache/discrim_jax/deb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL := 2

# The fonts of the 100-class `fonts` data set (discrim_jax/data/fonts.py
# PACKAGES, which a test keeps equal to this list); only `make fonts` installs them.
FONT_PACKAGES := fonts-dejavu-core fonts-dejavu-extra fonts-liberation \
  fonts-freefont-ttf fonts-urw-base35 fonts-croscore fonts-crosextra-carlito \
  fonts-crosextra-caladea fonts-open-sans fonts-roboto-unhinted \
  fonts-linuxlibertine fonts-ebgaramond fonts-noto-core fonts-texgyre \
  fonts-paratype fonts-lato fonts-gfs-didot fonts-gfs-artemisia
FONTS_CACHE := $(HOME)/.cache/discrim_jax/fonts
FONTS_ERROR := error: could not get Debian's font packages ($(FONT_PACKAGES)): apt needs the network or a mirror

.PHONY: setup setup-test data fonts dejavu run test bench bench-input clean

setup: $(STAMP)
setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python3 cannot make virtual environments: installing python3-venv"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	[ -x $(BIN)/pip ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.5' || echo "uv could not be installed: pip installs the requirements"
	$(call install,-e '.$(EXTRAS)')
	$(BIN)/python tools/write_bytecode.py $(APP_MODULES)
	@touch $@

# PyTorch's CPU build first where its index answers; otherwise the default
# build that the extras pull from PyPI.
$(TEST_STAMP): $(STAMP)
	@if $(BIN)/python -c 'import torch' 2>/dev/null; then \
	  echo "PyTorch already installed"; \
	elif ! { $(BIN)/python -c '$(TORCH_INDEX_RESOLVES)' $(TORCH_CPU_INDEX) && \
	    UV_HTTP_TIMEOUT=15 $(UV_INSTALL) --index-url $(TORCH_CPU_INDEX) \
	    torch torchvision && $(BIN)/python -c 'import torchvision.ops'; } >/dev/null 2>&1; then \
	  echo "No working CPU build of PyTorch from $(TORCH_CPU_INDEX): the default build comes from PyPI"; \
	  $(BIN)/pip uninstall -q -y torch torchvision >/dev/null 2>&1 || true; \
	fi
	$(call install,-e '.$(TEST_EXTRAS)')
	$(BIN)/python tools/write_bytecode.py $(TEST_MODULES)
	@touch $@

data:
	@if ls $(FMNIST_SYSTEM)/*-ubyte.gz >/dev/null 2>&1 || \
	    ls $(FMNIST_CACHE)/usr/share/datasets/fashion-mnist/*-ubyte.gz >/dev/null 2>&1; then \
	  echo "Fashion-MNIST files present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "no root: unpacking Debian's dataset-fashion-mnist into $(FMNIST_CACHE)"; \
	  mkdir -p $(FMNIST_CACHE) && cd $(FMNIST_CACHE) && apt-get download dataset-fashion-mnist && \
	  dpkg -x dataset-fashion-mnist_*.deb . && rm -f dataset-fashion-mnist_*.deb; \
	fi

fonts:
	@if [ "$$(id -u)" = 0 ]; then \
	  { apt-get install -y -qq $(FONT_PACKAGES) || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FONT_PACKAGES); }; } \
	    >/dev/null 2>&1 || { echo "$(FONTS_ERROR)"; exit 1; }; \
	else \
	  echo "no root: unpacking Debian's font packages into $(FONTS_CACHE)"; \
	  mkdir -p $(FONTS_CACHE) && cd $(FONTS_CACHE) && \
	  { apt-get download $(FONT_PACKAGES) >/dev/null 2>&1 || { echo "$(FONTS_ERROR)"; exit 1; }; } && \
	  for f in *.deb; do dpkg -x $$f .; done && rm -f *.deb; \
	fi
	@echo "fonts installed: train with --config=experiments/configs/fonts.py"

# The DejaVu fonts the tests of `fonts` draw with (most systems have them).
dejavu:
	@if ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
	    $(FONTS_CACHE)/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf 2>/dev/null | grep -q .; then \
	  :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  { apt-get install -y -qq fonts-dejavu-core || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core; }; } >/dev/null 2>&1 || \
	    { echo "error: could not install fonts-dejavu-core: apt needs the network or a mirror"; exit 1; }; \
	else \
	  mkdir -p $(FONTS_CACHE) && cd $(FONTS_CACHE) && \
	  { apt-get download fonts-dejavu-core >/dev/null 2>&1 || \
	    { echo "error: could not download fonts-dejavu-core: apt needs the network or a mirror"; exit 1; }; } && \
	  dpkg -x fonts-dejavu-core_*.deb . && rm -f fonts-dejavu-core_*.deb; \
	fi

# The default job: CE vs CE+Gini+KL on the real Fashion-MNIST, on the CPU.
run: setup data
	$(BIN)/python experiments/compare.py --config=experiments/configs/fashion_mnist.py \
	  --workdir=workdirs/fashion_mnist_default --objectives=ce,gini_kl --seeds=1

# 8 fake CPU devices exercise the multi-device paths. Each worker takes whole
# test modules, the longest first (pyproject.toml, tests/conftest.py). Three
# workers on 2 cores keep both busy while one waits on a process it started or
# on a checkpoint's write: cold-cache suite 327-362 s against 355-370 s with
# two, three pairs alternated on a 2-core Xeon (docs/speed.md).
TEST_WORKERS ?= 3
test: setup-test data dejavu
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n $(TEST_WORKERS) -q tests

# Speed figures: the train/eval steps, the losses' overhead, PyTorch side by side.
bench: setup-test data
	$(BIN)/python experiments/bench.py --out=bench.json

bench-input: setup data
	$(BIN)/python experiments/bench_input.py

clean:
	rm -rf $(VENV) workdirs
