# vaultgemma-hf developer commands. `make demo` and `make test` each set up what they need first.
PYTHON ?= python
# The CPU build of torch is what CI and these machines use; on a GPU machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,convert,plot,quality
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-min quality style demo docs bench fixtures clean

install:
	$(PYTHON) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"

test: install
	$(PYTHON) -m pytest tests -q -p no:cacheprovider --timeout 900

# The same suite against the oldest transformers setup.py allows (CI tests the newest one), in a venv layered on
# this environment (also when it is itself a venv): the venv holds transformers and whatever it needs that differs.
TRANSFORMERS_MIN ?= 5.17.0
test-min: install
	$(PYTHON) -m venv .venv-min
	$(PYTHON) -c "import site; print('import site; ' + '; '.join(f'site.addsitedir({d!r})' for d in site.getsitepackages()))" \
		> "$$(.venv-min/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-outer-env.pth"
	.venv-min/bin/python -m pip install -q --disable-pip-version-check "transformers==$(TRANSFORMERS_MIN)"
	.venv-min/bin/python -m pytest tests -q -p no:cacheprovider --timeout 900

quality:
	$(PYTHON) -m ruff check src tests utils benchmarks examples
	$(PYTHON) -m ruff format --check src tests utils benchmarks examples

style:
	$(PYTHON) -m ruff check --fix src tests utils benchmarks examples
	$(PYTHON) -m ruff format src tests utils benchmarks examples

# The main job on the embedded default: DP continued pretraining of the tiny VaultGemma on the tiny corpus,
# then generation with the result. Everything is local; nothing is downloaded.
demo: install
	$(PYTHON) examples/demo.py --output-dir outputs/demo

docs:
	$(PYTHON) utils/check_docs.py docs/source/en

bench: install
	$(PYTHON) benchmarks/inference.py --shape tiny --device cpu
	$(PYTHON) benchmarks/dp_step.py --shape tiny --device cpu
	$(PYTHON) benchmarks/planner.py --skip-reference  # the dp_accounting reference re-calibration takes ~10 min per scenario

fixtures:
	$(PYTHON) utils/make_fixtures.py

clean:
	rm -rf outputs build dist src/*.egg-info .pytest_cache .ruff_cache .venv-min
