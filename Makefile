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

# NO_BROWSER=1 skips installing chromium with apt (outside the virtualenv) and the browser test
NO_BROWSER ?= $(LOWGEAR_NO_BROWSER)

test: $(VENV)/.test-installed
	LOWGEAR_NO_BROWSER=$(NO_BROWSER) bash scripts/ensure-browser.sh
	LOWGEAR_NO_BROWSER=$(NO_BROWSER) $(VENV)/bin/python -m pytest -q -rs -p no:cacheprovider --durations=15

clean:
	rm -rf $(VENV)
