"""generate.py's chat page in a real headless browser: Debian's chromium driven by Playwright.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: the
system chromium is used). Without them the test skips, or fails when $CI is set. The screenshot
is kept in test-artifacts/web_ui.png.
"""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from medlora.generation import ChatModel, GenerationSettings
from tests.conftest import ROOT
from tests.test_generation import running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "test-artifacts" / "web_ui.png"
QUESTION = "What can I do at home to relieve a tension headache?"
MAX_INPUT_CHARS = 300
# Greedy and a hard repetition penalty: a deterministic answer of varied words from the tiny adapter.
SERVER_FLAGS = ["--temperature", 0, "--repetition_penalty", 3, "--max_new_tokens", 40,
                "--max_input_chars", MAX_INPUT_CHARS]
SETTINGS = GenerationSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=40)

# Every text the newest assistant message shows, as the page updates it.
RECORD_UPDATES = """() => {
  window.botTexts = [];
  const record = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText;
    if (window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
  };
  new MutationObserver(record).observe(document.querySelector('#chatbot'),
                                       {childList: true, subtree: true, characterData: true});
}"""


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure under CI) saying what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright Python package (pip install playwright)")
        sync_playwright = None
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "the web UI test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def words(text: str) -> list:
    """The words of a text, whatever markdown rendering did to the punctuation around them."""
    return re.findall(r"\w+", text)


def test_chat_page_streams_an_answer(tiny_adapter):
    sync_playwright = browser_or_skip()
    expected = ChatModel.load(lora_weights=str(tiny_adapter)).answer([{"role": "user", "content": QUESTION}],
                                                                     settings=SETTINGS)
    assert words(expected)
    with running_server("--lora_weights", tiny_adapter, *SERVER_FLAGS) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#question textarea", timeout=60_000)
            assert page.get_by_text("Not medical advice").is_visible()
            page.evaluate(RECORD_UPDATES)

            page.fill("#question textarea", QUESTION)
            page.press("#question textarea", "Enter")
            bot = page.locator('#chatbot [data-testid="bot"]').last
            deadline = time.monotonic() + 120
            while words(bot.inner_text() if bot.count() else "") != words(expected):
                assert time.monotonic() < deadline, f"no full answer on the page: {page.inner_text('#chatbot')!r}"
                page.wait_for_timeout(200)
            assert QUESTION in page.locator('#chatbot [data-testid="user"]').last.inner_text()
            assert page.input_value("#question textarea") == ""
            updates = page.evaluate("window.botTexts")
            # streamed: the answer grew on the page, each text the beginning of the final one
            final = "".join(words(expected))
            assert len(updates) > 1 and all(final.startswith("".join(words(text))) for text in updates)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # a message over --max_input_chars is refused with a message, and kept for editing
            page.fill("#question textarea", "a" * (MAX_INPUT_CHARS + 1))
            page.click("#send")
            page.get_by_text(f"the limit is {MAX_INPUT_CHARS}").wait_for(timeout=30_000)
            assert page.locator('#chatbot [data-testid="user"]').count() == 1
            assert len(page.input_value("#question textarea")) == MAX_INPUT_CHARS + 1

            page.click("#clear")
            page.locator('#chatbot [data-testid="bot"]').wait_for(state="detached", timeout=30_000)
            assert page.locator('#chatbot [data-testid="user"]').count() == 0
        finally:
            browser.close()
