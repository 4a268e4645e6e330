# Two commands on a fresh machine:  `make demo` (prepare Shakespeare, train the CPU preset, print a sample)
# and `make test` (ruff's lint and format checks, then the suite). Both install what they need first.
PYTHON ?= python3
SHAKESPEARE ?= $(firstword $(wildcard ../shared/data/tinyshakespeare.txt data/tinyshakespeare.txt))
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test

# torch first, pinned: left to pip's resolver, a bare `torch` pulls several GB of CUDA packages on Linux.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e ".[test,hf,data,serve]"

demo: install
	$(PYTHON) -m nanokimi prepare shakespeare_char $(if $(SHAKESPEARE),--input=$(SHAKESPEARE)) --out=data/shakespeare_char
	$(PYTHON) -m nanokimi train shakespeare-char-cpu --overwrite
	$(PYTHON) -m nanokimi sample out/shakespeare-char-cpu --max_new_tokens=500

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest
