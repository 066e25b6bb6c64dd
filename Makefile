# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODELS := models/digits_cnn.onnx models/digits_mlp.onnx models/tiny_transformer.onnx
PRELOAD ?= {"digits": {"file": "models/digits_cnn.onnx", "samples": "models/digits_cnn.samples.npz"}}

.PHONY: install constraints run test lint soak bench bench-compression bench-jobs models browser clean proto

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone: pinned to the CPU wheel, so nothing later can pull a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	# The tested versions: a new release of a dependency cannot change what `make test` runs.
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# After changing dependencies in pyproject.toml: record the versions now installed as the tested set.
constraints: install
	{ head -n 3 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

models: $(STAMP)
	@test -f models/digits_cnn.onnx -a -f models/digits_mlp.onnx -a -f models/tiny_transformer.onnx \
		|| $(PY) models/build_models.py --out models

# The gRPC messages, generated from app/api/grpc_service/inference.proto and committed (protoc never runs at
# install); regenerate after changing the .proto, with the grpcio-tools of constraints.txt.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. app/api/grpc_service/inference.proto

# The example model is registered as `digits` unless SLIMSERVE_PRELOAD_MODELS says otherwise.
run: install models
	SLIMSERVE_PRELOAD_MODELS='$(or $(SLIMSERVE_PRELOAD_MODELS),$(PRELOAD))' $(VENV)/bin/slimserve serve

# The dashboard test drives Debian's chromium (never a downloaded browser); installed here when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the dashboard browser test will be skipped"

# Should pytest itself die (a signal in native code), the last lines say in which test and where.
test: install models browser
	$(PY) -m pytest || { status=$$?; $(PY) -m tests.fault_report $$status; exit $$status; }

lint: install
	$(VENV)/bin/ruff check app tests benchmarks models
	$(VENV)/bin/mypy app tests

# The full bounded load test: 20,000 requests at concurrency 64 across two variants during a compression job.
soak: install models
	SOAK_REQUESTS=20000 $(PY) -m pytest tests/e2e/test_soak.py -v

bench: install models
	$(PY) benchmarks/serving.py

bench-compression: install models
	$(PY) benchmarks/compression.py --write docs/compression.md

bench-jobs: install models
	$(PY) benchmarks/jobs.py --write docs/jobs.md

clean:
	rm -rf var .pytest_cache
