"""The playground in headless Chromium (Debian's, driven by Playwright): pick an adapter, chat,
watch the answer stream and the panels update, upload a good and a bad adapter."""
import shutil
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]


@pytest.fixture(scope="module")
def page(live_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/install_browser.sh installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1100})
        pg.goto(live_server.url + "/")
        pg.wait_for_selector("#message textarea", timeout=60_000)
        yield pg
        browser.close()


def engine_status(page) -> str:
    return page.locator("#engine-status").inner_text()


def test_chat_streams_with_an_adapter_and_panels_update_then_stop(page, live_server):
    engine = live_server.state.engine
    aborted = engine.metrics.finished_by_reason["abort"]
    page.click("#send")                 # an empty message: a clear message, nothing sent
    page.get_by_text("the message is empty").first.wait_for(timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "empty_message.png"), full_page=True)
    assert engine.status()["running"] == 0 and not page.locator("#chatbot .bot").count()
    page.click("#adapter input")
    page.get_by_role("option", name="r8_all").click()
    page.fill("#message textarea", "Tell me about the sea.")
    page.keyboard.press("Enter")
    bot = page.locator("#chatbot .message.bot, #chatbot .bot").last
    bot.wait_for(timeout=30_000)
    lengths = []
    for _ in range(40):                 # the answer grows while it streams
        lengths.append(len(bot.inner_text()))
        if len(set(lengths)) >= 3:
            break
        page.wait_for_timeout(150)
    assert len(set(lengths)) >= 3, f"no streaming seen: {lengths}"
    # the live panels follow the engine: one running request, a batch with the adapter
    page.wait_for_function("() => document.querySelector('#engine-status')"
                           ".innerText.includes('running 1')", timeout=10_000)
    page.wait_for_timeout(1500)
    assert "running 1" in engine_status(page) and "decode rows" in engine_status(page)
    page.screenshot(path=str(ARTIFACTS / "chat_streaming.png"), full_page=True)
    page.click("#stop")                 # cancels the event: the engine aborts the request
    page.wait_for_function("() => document.querySelector('#engine-status')"
                           ".innerText.includes('running 0')", timeout=10_000)
    assert engine.metrics.finished_by_reason["abort"] == aborted + 1
    stopped = len(bot.inner_text())
    page.wait_for_timeout(2500)         # panels keep refreshing; the answer no longer grows
    assert len(bot.inner_text()) == stopped and stopped > 0
    # the batch reads "idle" once the last step is 2 s old, at the panels' next refresh (a busy
    # 2-core machine may serve that refresh late)
    page.wait_for_function("() => document.querySelector('#engine-status')"
                           ".innerText.includes('idle')", timeout=10_000)
    assert "running 0" in engine_status(page)
    page.screenshot(path=str(ARTIFACTS / "chat_stopped_panels.png"), full_page=True)


def test_compare_side_by_side(page):
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-prompt textarea", "Say hi.")
    page.click("#compare-run")
    page.wait_for_function("() => [...document.querySelectorAll('textarea')]"
                           ".filter(t => t.closest('[id^=compare-answer]') && t.value)"
                           ".length >= 2", timeout=30_000)
    page.wait_for_timeout(2000)         # both columns keep streaming, side by side
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)


def upload(page, name, paths):
    page.get_by_role("tab", name="Adapters").click()
    page.fill("#upload-name textarea, #upload-name input", name)
    page.set_input_files("#upload-files input[type=file]", [str(p) for p in paths])
    page.wait_for_timeout(1000)
    status = page.locator("#adapter-status")
    before = status.inner_text()
    page.click("#upload")
    page.wait_for_function(
        "before => { const t = document.querySelector('#adapter-status').innerText;"
        " return t !== before && /^(✅|❌)/.test(t); }",     # not while progress shows
        arg=before, timeout=30_000)
    return status.inner_text()


def test_upload_good_and_bad_adapters(page, live_server, parity_adapters, tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for f in Path(parity_adapters["r4_qv"]).iterdir():
            z.write(f, f.name)
    msg = upload(page, "browser_upload", [good])
    assert "registered" in msg and "browser_upload" in live_server.state.engine.store
    page.wait_for_function(             # the batch plot's legend takes the new adapter
        "() => document.querySelector('#batch-plot').innerText.includes('browser_upload')",
        timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "upload_good.png"), full_page=True)
    bad_dir = tmp_path / "bad"
    shutil.copytree(parity_adapters["r4_qv"], bad_dir)
    (bad_dir / "adapter_model.safetensors").unlink()
    (bad_dir / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        for f in bad_dir.iterdir():
            z.write(f, f.name)
    page.fill("#upload-name textarea, #upload-name input", "")
    msg = upload(page, "browser_bad", [bad])
    assert "refused" in msg and "pickled weights are never loaded" in msg
    page.screenshot(path=str(ARTIFACTS / "upload_bad.png"), full_page=True)
