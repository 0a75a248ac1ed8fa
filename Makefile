# The two commands a new user runs: `make demo` and `make test`. Both create .venv when needed.
# The accelerator is chosen by the machine (CUDA when it works, else the CPU); DS_ACCELERATOR=cpu
# forces the CPU (the tests set it themselves).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE ?= $(CURDIR)/.cache/apollo_ds
DATA := $(CACHE)/data
BENCH := $(CACHE)/bench
export PYTHONUNBUFFERED := 1

.PHONY: venv data demo-data demo test test-all test-slow bench gpu-check plan clean wheelhouse \
	install-offline

venv: $(STAMP)
$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# torch first: the pinned CPU wheel; later packages must not pull a CUDA build.
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -c constraints.txt -e '.[mpi,test,tensorboard]'
	touch $(STAMP)

# Offline install onto a machine's own CUDA PyTorch (torch >=2.11,<2.14; no network there).
# Here, where PyPI is reachable: every other wheel apollo_ds needs, for PYTHON_VERSION, minus
# what torch==TORCH_VERSION's own install brings and PREINSTALLED (globs, comma separated);
# refused when over WHEELHOUSE_MAX_MIB. There: make install-offline PY=python3 (TARGET=dir:
# into a folder for PYTHONPATH instead of the interpreter), then make gpu-check PY=python3.
PYTHON_VERSION ?= 3.12
TORCH_VERSION ?= 2.11.0
PREINSTALLED ?=
WHEELS ?= wheelhouse
WHEELHOUSE_MAX_MIB ?= 60
TARGET ?=

wheelhouse: $(STAMP)
	$(VPY) tools/wheelhouse.py --python-version $(PYTHON_VERSION) --torch $(TORCH_VERSION) \
		--out $(WHEELS) --max-mib $(WHEELHOUSE_MAX_MIB) --preinstalled '$(PREINSTALLED)'

# Into the interpreter: pip resolves against its installed torch, which satisfies
# torch>=2.11,<2.14 and is never touched (the wheelhouse holds no torch to replace it with).
# Into TARGET: pip ignores what is installed there, so every wheel goes in as is (--no-deps;
# the wheelhouse is exactly the closure minus torch's own).
install-offline:
	$(PY) -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
	$(if $(TARGET),$(PY) -m pip install --no-index --no-deps --target $(TARGET) $(WHEELS)/*.whl,\
		$(PY) -m pip install --no-index --find-links $(WHEELS) apollo_ds)
	$(PY) -c 'import torch; print("torch after install:", torch.__version__)'

# Corpus -> tokenizer -> indexed dataset, as file dependencies: a rebuilt corpus rebuilds what
# depends on it, and a rerun with everything present does nothing.
data: $(DATA)/corpus.idx

$(DATA)/corpus.txt: | $(STAMP)
	$(VPY) data_prep/fetch_corpus.py --out-dir $(DATA)

$(DATA)/spm8k.model: $(DATA)/corpus.txt
	$(VPY) data_prep/train_tokenizer.py --input $< --vocab-size 8192 --model-prefix $(DATA)/spm8k

$(DATA)/corpus.idx: $(DATA)/corpus.txt $(DATA)/spm8k.model
	$(VPY) data_prep/preprocess_data.py --input $(DATA)/corpus.txt \
		--tokenizer-model $(DATA)/spm8k.model --output-prefix $(DATA)/corpus --workers 2 --append-eod

# The demo's data: the recommended preset's 1024-piece tokenizer and dataset (the same files
# benchmarks/acceleration.py builds, so the preset, the demo and the benchmark share them).
demo-data: $(BENCH)/corpus_spm1024.idx

$(BENCH)/spm1024.model: $(DATA)/corpus.txt
	mkdir -p $(BENCH)
	$(VPY) data_prep/train_tokenizer.py --input $< --vocab-size 1024 --model-prefix $(BENCH)/spm1024

$(BENCH)/corpus_spm1024.idx: $(DATA)/corpus.txt $(BENCH)/spm1024.model
	$(VPY) data_prep/preprocess_data.py --input $(DATA)/corpus.txt \
		--tokenizer-model $(BENCH)/spm1024.model --output-prefix $(BENCH)/corpus_spm1024 \
		--workers 2 --append-eod

# The recommended growth preset (configs/recommended_grow_tiny.yaml: train 3 unique layers,
# then interpolate to 12) on 2 processes, then what a user does with it: export, held-out
# loss, a greedy sample.
demo: demo-data
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus 2 apollo_ds/pretrain.py \
		--config configs/recommended_grow_tiny.yaml \
		data.prefix=$(BENCH)/corpus_spm1024 data.tokenizer=$(BENCH)/spm1024.model \
		data.cache_dir=$(BENCH)/index_cache train.out_dir=runs/demo train.save_interval=200 \
		train.eval_interval=100 train.eval_iters=6 train.log_interval=20
	$(VPY) -m apollo_ds.convert.to_hf --checkpoint runs/demo --output runs/demo_hf
	$(VPY) -m apollo_ds.cli eval --checkpoint runs/demo_hf --data $(BENCH)/corpus_spm1024 \
		--max-windows 96
	$(VPY) -m apollo_ds.cli generate --checkpoint runs/demo_hf --prompt "The king said" \
		--max-new-tokens 32 --repetition-penalty 1.3

# TEST_WORKERS pytest-xdist processes (0: one, in process). Two overlap one test's waiting
# (hangs, kills, timeouts, process start-up) with another's work on two cores. Each file runs
# whole on one worker, the longest first (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST = $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) tests -m "not slow" --durations=15

test-slow: $(STAMP)
	$(PYTEST) tests -m slow --durations=15

test-all: $(STAMP)
	$(PYTEST) tests --durations=15

bench: data
	$(VPY) benchmarks/throughput.py --data-prefix $(DATA)/corpus --tokenizer $(DATA)/spm8k.model

# One bounded check on a CUDA GPU (sized for < 8 min on an H100/H200): throughput, MFU and
# memory, pool overhead, expansion cost, exact resume. No $(STAMP) prerequisite: the venv
# recipe pins the CPU torch wheel, which would replace a CUDA build. PY=python3: a machine's
# own CUDA Python after make install-offline (default: the venv's). env -u: a
# DS_ACCELERATOR=cpu exported into make would force the CPU.
GPU_PY = $(if $(filter command line,$(origin PY)),$(PY),$(VPY))
gpu-check:
	env -u DS_ACCELERATOR $(GPU_PY) benchmarks/gpu_check.py --out runs/gpu_check.json

plan: $(STAMP)
	$(VENV)/bin/apollo-ds plan --config configs/tiny_cpu.yaml

clean:
	rm -rf runs build *.egg-info wheelhouse
