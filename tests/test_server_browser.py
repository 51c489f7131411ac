"""The chat page at / in a real headless browser: type a message, watch the answer stream in.

Debian's chromium and chromedriver through selenium (`scripts/ensure-browser.sh`, run by `make test`, installs them). Outside
CI a machine without them skips this test; in CI (CI=true) their absence is a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import openai
import pytest

from test_server import start_model_server, stop_model_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1024,768"]


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if os.environ.get("LOWGEAR_NO_BROWSER", "0") not in ("", "0"):
        pytest.skip("LOWGEAR_NO_BROWSER is set (make test NO_BROWSER=1): the browser test is skipped")
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not chromium or not driver:
        missing.append("chromium + chromedriver (bash scripts/ensure-browser.sh, as root)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lowgear-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    proc, base = start_model_server("--max-seq-len", "512", "--cache-size", "1024", "--max-batch-size", "4")
    yield base
    stop_model_server(proc)


# Records every text the newest assistant bubble shows, so the test sees the answer grow.
OBSERVE = """
window.__seen = [];
const box = document.getElementById('messages');
new MutationObserver(() => {
  const bubbles = box.querySelectorAll('.msg.assistant');
  if (!bubbles.length) return;
  const node = bubbles[bubbles.length - 1].firstChild;
  const text = node && node.nodeType === Node.TEXT_NODE ? node.textContent : '';
  if (window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
}).observe(box, {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_streams_an_answer(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    question = "Name three colors."
    browser.get(server + "/")
    wait = WebDriverWait(browser, 180, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "model").text.strip())  # the page asked /v1/models
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.execute_script(OBSERVE)

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(question)
    prompt.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true'], .msg.error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"

    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert [u.text for u in user] == [question]
    seen = [s for s in browser.execute_script("return window.__seen;") if s]
    answer = seen[-1]
    assert answer.strip()
    # streamed: the bubble showed several growing prefixes of the answer before the whole of it
    assert len(seen) >= 3, seen
    assert all(answer.startswith(s) for s in seen), seen

    api = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    same = api.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                       max_tokens=12, temperature=0)
    assert answer == same.choices[0].message.content

    # a second turn carries the conversation and streams too
    prompt.send_keys("And one more?")
    prompt.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == 2
               or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text.strip()
