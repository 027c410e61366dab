# Everything goes through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv test unit integration reliability demo stop bench bench-quick gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	@command -v java >/dev/null 2>&1 || { echo "java not found: TorchServe's frontend needs Java 17: apt-get install -y openjdk-17-jre-headless"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,hf,examples,plot,bench]'
	touch $@

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

# The issue's full load counts, plus faults, broken archives, bad input and the security scan.
reliability: venv
	AITUNE_LOAD=full $(BIN)/python -m pytest -s $(PYTEST_ARGS) tests/integration/test_load.py \
		tests/integration/test_faults.py tests/integration/test_broken_archives.py tests/integration/test_tampered.py \
		tests/unit/test_security.py tests/unit/test_checkpoint.py \
		tests/integration/test_serve.py::test_bad_request_gets_4xx_and_the_worker_keeps_serving \
		tests/integration/test_serve.py::test_bad_request_in_a_batch_fails_alone \
		tests/integration/test_serve.py::test_request_without_the_key_is_refused \
		tests/integration/test_serve.py::test_unknown_model_is_404 \
		tests/integration/test_minilm.py::test_bad_text_requests tests/integration/test_many_streams.py

demo: venv
	$(BIN)/python examples/demo.py

stop: venv
	$(BIN)/torchserve --stop

bench: venv
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/checkpoint_figures.py
	$(BIN)/python benchmarks/minilm.py
	$(BIN)/python benchmarks/cpu_speed.py
	$(BIN)/python benchmarks/served_split.py
	$(BIN)/python benchmarks/hf_classifier.py
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/streams.py

bench-quick: venv
	$(BIN)/python benchmarks/run.py --quick
	$(BIN)/python benchmarks/cpu_speed.py --quick
	$(BIN)/python benchmarks/served_split.py --quick
	$(BIN)/python benchmarks/hf_classifier.py --quick
	$(BIN)/python benchmarks/kernels.py --quick
	$(BIN)/python benchmarks/generate.py --quick
	$(BIN)/python benchmarks/streams.py --quick

# On a GPU machine, with .whl/ from scripts/gpu_wheels.sh beside it; no venv, no Java (docs/gpu.md).
GPU_REPORT ?= gpu-report
gpu-check:
	bash scripts/gpu_check.sh $(GPU_REPORT)

clean:
	rm -rf $(VENV) .venv-plain *.egg-info model_store/*.mar logs
