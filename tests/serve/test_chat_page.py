"""End to end: the chat page in headless Chromium streams a reply from a real server."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from serving import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def need_chromium():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install 'nanoseek[e2e]')")
    if missing:
        reason = f"needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("NANOSEEK_CI"):
            pytest.fail(f"CI must run the browser test but it {reason}")
        pytest.skip(reason)


@pytest.fixture()
def browser():
    need_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply(browser, checkpoint, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(checkpoint)
    try:
        browser.get(server.url + "/")
        assert "nanoseek" in browser.title
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("40")
        browser.find_element(By.ID, "input").send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        user = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.user"))
        assert user.text == "Hello there"
        # streamed text appears in the assistant bubble, and the send button comes back when it ends
        reply = WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant").text or None
        )
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "send").is_enabled())
        assert reply and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        shot = Path(os.environ.get("NANOSEEK_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        # a second turn: the transcript now holds both exchanges
        browser.find_element(By.ID, "input").send_keys("And again")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
        time.sleep(0.2)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    finally:
        server.stop()
