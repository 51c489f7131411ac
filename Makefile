# The two set-up commands of the README. Each makes its own virtualenv on first use.
VENV ?= .venv
PROMPT ?= In three sentences, why do older GPUs still matter for running language models?

.PHONY: demo test clean

$(VENV)/.demo-installed: pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh demo
	touch $@

$(VENV)/.test-installed: pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh test
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/lowgear generate --chat --greedy --max-new-tokens 120 "$(PROMPT)"

test: $(VENV)/.test-installed
	bash scripts/ensure-browser.sh
	$(VENV)/bin/python -m pytest -q -rs -p no:cacheprovider --durations=15

clean:
	rm -rf $(VENV)
