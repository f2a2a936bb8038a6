# stenvan: `make demo` runs the main job on the synthetic dataset, `make test` runs the tests.
# Both install into .venv on first use (`make install`, idempotent).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that install from this project's machines' local disk; override for yours,
# e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/synthetic_mars
DEMO_SHARDS ?= shards/synthetic_mars
DEMO_RUN ?= runs/demo

.PHONY: install test demo bench gpu-check clean-demo

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# DALI's wheel must match torch's CUDA major version; a CPU-only torch takes the smaller cu13 wheel.
	extra=$$($(PY) -c "import torch; v = torch.version.cuda; print('cu12' if v and v.startswith('12') else 'cu13')"); \
	$(PY) -m pip install -q -e ".[$$extra,test]"
	$(PY) -c "import torch, torchvision, nvidia.dali, webdataset; print('installed: torch', torch.__version__, '| DALI', nvidia.dali.__version__)"
	touch $(STAMP)

# Test files are spread over TEST_WORKERS processes (pytest-xdist; each file stays in one process, so a module's
# shared runs are built once): 7m50s on 2 cores with 2, 10m52s in one process (TEST_WORKERS=0).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) $(DEMO_RUN)
	$(PY) -m prepare synthetic --layout mars --out $(DEMO_DATA) --ids 120 --seed 0 --max-len 60
	$(PY) -m prepare mars --data-dir $(DEMO_DATA) --info-dir $(DEMO_DATA)/info --out $(DEMO_SHARDS) --workers 2
	$(PY) -m prepare verify $(DEMO_SHARDS)
	$(PY) -m prepare inspect $(DEMO_SHARDS)
	$(PY) train.py --config configs/demo.yaml --data $(DEMO_SHARDS) --out $(DEMO_RUN)
# dense: every frame of a tracklet, in clips of T (paper mode's one clip of 4 frames makes the figure swing
# with the seed and the CPU: see configs/demo.yaml)
	$(PY) eval.py --checkpoint $(DEMO_RUN)/last.pt --data $(DEMO_SHARDS) --mode dense --untrained \
		--out $(DEMO_RUN)/eval-untrained --summary $(DEMO_RUN)/metrics.json --label untrained
	$(PY) eval.py --checkpoint $(DEMO_RUN)/last.pt --data $(DEMO_SHARDS) --mode dense --rerank \
		--out $(DEMO_RUN)/eval-trained --summary $(DEMO_RUN)/metrics.json --label trained
	@echo "trained vs untrained (same model at its initial weights), plain and re-ranked: $(DEMO_RUN)/metrics.json"
# one search on the synthetic test set: each query's top 10 in the gallery (same-camera copies left out)
	$(PY) embed.py --checkpoint $(DEMO_RUN)/last.pt --query $(DEMO_SHARDS) --gallery $(DEMO_SHARDS) --drop-junk --mode dense \
		--top-k 10 --pictures 1 --out $(DEMO_RUN)/search

# Every benchmark on this machine (GPU variants where CUDA is present), then benchmarks/RESULTS.md.
bench: $(STAMP)
	test -f $(DEMO_SHARDS)/manifest.json || ( $(PY) -m prepare synthetic --layout mars --out $(DEMO_DATA) --ids 60 \
		--seed 0 && $(PY) -m prepare mars --data-dir $(DEMO_DATA) --out $(DEMO_SHARDS) --workers 2 )
	$(PY) -m benchmarks.prepare
	$(PY) -m benchmarks.synthetic
	$(PY) -m benchmarks.non_local
	$(PY) -m benchmarks.loader --data $(DEMO_SHARDS) --raw $(DEMO_DATA)
	$(PY) -m benchmarks.train_step --arch nvan
	$(PY) -m benchmarks.train_step --arch ste_nvan
	$(PY) -m benchmarks.eval --data $(DEMO_SHARDS)
	$(PY) -m benchmarks.report

# The GPU path at real scale in one command (benchmarks/gpu_check.py, benchmarks/README.md): on a CUDA machine the
# gpu tests, every benchmark at the paper's sizes and a MARS-scale run within --minutes (default 6); without CUDA a
# CPU smoke run of the same stages at tiny sizes. No dependency on `make install`: it runs with the venv's python
# when there is one, else python3 (the lent GPU image's torch), e.g.
#   PYTHONPATH=$PWD:/tmp/site make gpu-check GPU_CHECK_ARGS="--out $OUT"
GPU_CHECK_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_SHARDS) $(DEMO_RUN)
