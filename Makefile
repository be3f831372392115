# dit-video: everything a researcher runs, as make targets. See README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (on these machines `torch==2.13.0` resolves to a local
# CPU wheel); with an NVIDIA GPU, pip's default (CUDA) build. Override TORCH / TORCH_INDEX if needed,
# e.g. `make install TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu` elsewhere.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH ?= $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
TORCH_INDEX ?=
EXTRAS ?= dev,demo,scenes
DEMO_DIR ?= outputs/demo
CAMERA_DIR ?= outputs/demo-camera

.PHONY: install demo demo-camera test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the torch
	# above (no build isolation, which would fetch a CUDA torch) and without its CUDA ops.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15" "hydra-submitit-launcher>=1.2"
	touch $@

install: $(VENV)/.installed

# End to end on the built-in synthetic data, on CPU: shards -> VAE -> DiT -> samples -> score.
demo: install
	$(PY) -m dit_video.demo --out $(DEMO_DIR)

# The same chain on real textures under camera motion (pans, tilts, zooms): shards -> VAE ->
# cached latents -> DiT -> samples -> scene and motion table (real / VAE / generated).
demo-camera: install
	$(PY) -m dit_video.demo --kind camera --out $(CAMERA_DIR)

# The whole suite, multi-process and compile tests included (what CI runs): two pytest workers,
# one per core, one thread each (a second BLAS thread per worker only oversubscribes the cores);
# a test file stays on one worker so its module fixtures are built once.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

# A quick pass while editing: the tests not marked slow.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/model_step.py

clean:
	rm -rf $(VENV) outputs
