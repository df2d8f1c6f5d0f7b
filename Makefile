# kiln: the two commands of the README, and what they stand on.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export KILN_HOME ?= $(HOME)/.kiln

.PHONY: run test install install-test postgres chromium slurm sandbox test-sqlite test-postgres bench bench-llm bench-plugin bench-mcp bench-mcp-conformance bench-dataset

## make run: install kiln and bring the embedded stack up; it runs a sleep job, then serves until Ctrl-C
# the kiln of $(PYTHON), the one just installed, not whichever `kiln` is first on PATH
run: install
	$(PYTHON) -m kiln.cli up

## make test: install kiln with its test tools, start PostgreSQL and a single-node SLURM, and run every test
test: install-test postgres chromium slurm sandbox
	$(PYTHON) -m pytest tests/sandbox -q -x
	$(PYTHON) -m pytest tests/mcp -q -x
	$(PYTHON) -m pytest tests/lab -q -x
	$(MAKE) -j2 test-sqlite test-postgres

# two lanes side by side (`make -j2`; one after the other they took over 90 min in CI), each test session with a
# stack, ports and KILN_HOME of its own: the unit tests, the integration tests on SQLite then SLURM's; the integration
# tests on PostgreSQL, the end-to-end ones, then the kill matrix, which restarts PostgreSQL (the SQLite lane does not
# use it). The unit tests (3 min) go in the SQLite lane, the shorter (a run: ~55 min against 68).
test-sqlite:
	$(PYTHON) -m pytest tests/unit -q
	$(PYTHON) -m pytest tests/integration -q -x --durations=30
	$(PYTHON) -m pytest tests/slurm -q -x

test-postgres:
	KILN_TEST_DATABASE=postgresql $(PYTHON) -m pytest tests/integration -q -x --durations=30 \
		--ignore=tests/integration/test_zz_kill_matrix.py
	$(PYTHON) -m pytest tests/e2e -q -x
	KILN_TEST_DATABASE=postgresql $(PYTHON) -m pytest tests/integration/test_zz_kill_matrix.py -q -x --durations=5

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e '.[test]'

# PostgreSQL 15 from Debian, with a superuser role `kiln` the tests create their databases with
postgres:
	@command -v pg_ctlcluster >/dev/null || (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)
	@pg_lsclusters -h | grep -q online || pg_ctlcluster $$(pg_lsclusters -h | head -1 | cut -d' ' -f1) main start
	@su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='kiln'\"" | grep -q 1 || \
		su postgres -c "psql -qc \"CREATE ROLE kiln LOGIN SUPERUSER PASSWORD 'kiln'\""

# headless Chromium from Debian: the test that opens a job's run page in the Prefect UI
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# the plugin sandbox's tools from Debian (runc, umoci, skopeo, bubblewrap, busybox-static; mmdebstrap for the
# tests' Python image), installed if missing
sandbox:
	scripts/sandbox-deps.sh

# a single-node SLURM on localhost (slurm-wlm and munge from Debian, installed if missing)
slurm:
	scripts/slurm-up.sh

bench: install
	$(PYTHON) bench/latency.py

# llmock comes with the test tools; LiteLLM's proxy, the peer, goes into a venv of its own (/tmp/venv-litellm)
bench-llm: install-test
	$(PYTHON) bench/llm_proxy.py

# as root: the plugin jobs run in sandbox tier A (runc with cgroups); the sandbox's tools are installed if missing
bench-plugin: install sandbox
	$(PYTHON) bench/plugin_exec.py

# the in-repo MCP server (tests/mcp/server.py) direct and deployed through kiln: tools/call round trip and kill -9 → serving
bench-mcp: install
	$(PYTHON) bench/mcp_host.py

# the MCP conformance suite, direct vs through kiln; needs Node 22 and the suite from npm (the script's --install)
bench-mcp-conformance: install
	$(PYTHON) bench/mcp_conformance.py

# dataset_process vs matminer's featurize_dataframe(n_jobs=2): dcdft replicated and perturbed to 10,000 and 100,000 rows
bench-dataset: install
	$(PYTHON) bench/dataset_process.py
