"""The chat page at / in real headless Chromium (Debian's), driven by Playwright: type, see a streamed answer."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from test_server import ServerThread, metrics  # noqa: E402  (same folder; pytest puts it on sys.path)

QUESTION = "Write two sentences about Paris, the capital of France."
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(bundled_gguf):
    from llamaforge.api import Llama
    from llamaforge.server.app import create_app
    try:
        llm = Llama.load(bundled_gguf)
    except ValueError as e:
        pytest.skip(f"cannot load the bundled model: {e}")
    with ServerThread(create_app(llm, model_id="smollm2-test", max_batch=2, ctx=512)) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install-test-peers.sh installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1000, "height": 700})
        pg.goto(server.url + "/")
        yield pg
        browser.close()


@pytest.mark.slow
def test_chat_page_streams_an_answer(page, server, tmp_path):
    sync_api.expect(page.locator("#model")).to_have_text("smollm2-test")
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#max-tokens", "24")
    page.locator("#temperature").fill("0")
    # a 24-token answer (not the 8 tokens of "The capital of France is Paris."): enough pieces that
    # the browser sees it grow even when a busy test process hands it several chunks at once
    page.fill("#input", QUESTION)
    # record the answer bubble's length at every DOM change, to see it grow piece by piece
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const m = document.querySelector('.msg.assistant');
                                     if (m) window.seen.push(m.textContent.length); })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.keyboard.press("Enter")
    user = page.locator(".msg.user")
    sync_api.expect(user).to_have_text(QUESTION)
    answer = page.locator(".msg.assistant").last
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
    final = answer.text_content()
    assert "Paris" in final
    sizes = sorted(set(page.evaluate("window.seen")) - {0})
    assert len(sizes) >= 3 and sizes[-1] == len(final), f"the answer did not stream: sizes {sizes}"
    sync_api.expect(page.locator("#status")).to_contain_text("finish_reason")
    assert page.evaluate("conversation") == [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": final}]
    shots = Path(os.environ.get("LLAMAFORGE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "chat_page.png"))

    # a second turn keeps the conversation; the stop button cancels it on the server
    page.fill("#max-tokens", "400")
    page.fill("#input", "Now write a long poem about it.")
    page.click("#send")
    page.wait_for_function("() => { const m = document.querySelector('.msg.assistant.streaming');"
                           " return m && m.textContent.length > 0; }", timeout=60_000)
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("stopped")
    assert page.locator(".msg.user").count() == 2
    deadline = time.time() + 15
    while metrics(server)["llamaforge_requests_running"] and time.time() < deadline:
        time.sleep(0.1)
    m = metrics(server)
    assert m["llamaforge_requests_running"] == 0 and m["llamaforge_requests_cancelled_total"] == 1
