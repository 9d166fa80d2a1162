"""The demo app in a real headless browser: Chromium (Debian's package) driven by Playwright.

The app runs in this process on a free localhost port over two tiny adapters on one backbone. The test clicks
Search without an image (an error is shown), switches the adapter, picks an example query, searches, and checks
that the first result shown is the query image itself (caption, score 1.0000, and the image actually served and
rendered); then it uploads another gallery image through the file input and checks the same.

Without Chromium or Playwright the test skips and says why; with ``VPDML_REQUIRE_BROWSER=1`` (set by .ci/run) it
fails instead. ``VPDML_CHROMIUM`` points at another Chromium/Chrome binary. No `playwright install`: the system
Chromium is used.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from helpers.app_fixtures import write_adapters_and_indexes

pytestmark = [
    pytest.mark.filterwarnings("ignore:No image processor:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(300),
]
CAPTION = re.compile(r"#(\d+) · (\d\.\d{4}) · (\S+)")
TIMEOUT_MS = 60_000  # a loaded, shared machine can be slow; the test usually takes ~15 s


def _chromium() -> str | None:
    explicit = os.environ.get("VPDML_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser_or_skip() -> str:
    """The Chromium binary; skip (or fail under VPDML_REQUIRE_BROWSER=1) when it or a driver is missing."""
    missing = []
    chromium = _chromium()
    if chromium is None:
        missing.append("no Chromium (apt-get install chromium, or set VPDML_CHROMIUM)")
    for module, package in (("playwright", "playwright"), ("gradio", "gradio")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"no {module} (pip install '{package}', or pip install -e '.[test]')")
    if missing:
        reason = "browser test needs " + "; ".join(missing)
        if os.environ.get("VPDML_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (VPDML_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(reason)
    return str(chromium)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _first_result(page) -> tuple[tuple[str, str, str], object]:
    """The first caption shown in the results gallery, and the first result image."""
    results = page.locator("#vpdml-results")
    text = results.inner_text()
    captions = CAPTION.findall(text)
    assert captions, f"no result captions in {text!r}"
    return captions[0], results.locator("img").first


def _assert_shows_first(page, item: str, image_file: Path) -> None:
    """The first result is ``item``: caption ``#1 · 1.0000 · item``, its image served byte for byte and drawn."""
    page.locator("#vpdml-results img").first.wait_for(state="visible", timeout=TIMEOUT_MS)
    page.wait_for_function(
        "item => document.querySelector('#vpdml-results').innerText.includes('#1 · 1.0000 · ' + item)",
        arg=item,
        timeout=TIMEOUT_MS,
    )
    (rank, score, first_id), image = _first_result(page)
    assert (rank, score, first_id) == ("1", "1.0000", item)
    assert item in (image.get_attribute("alt") or "")
    image.wait_for(state="visible")
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=TIMEOUT_MS
    )
    box = image.bounding_box()
    assert box is not None and box["width"] > 10 and box["height"] > 10
    served = page.request.get(image.get_attribute("src"))
    assert served.ok and served.body() == image_file.read_bytes()


def test_search_in_a_real_browser(tmp_path, monkeypatch):
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from vpdml.app import launch_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    paths = write_adapters_and_indexes(tmp_path)
    demo = launch_app({"a": paths["a"], "b": paths["b"]}, port=_free_port(), block=False, default_k=3)
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            try:
                page.goto(demo.local_url)
                page.locator("#vpdml-search").wait_for(state="visible")

                # Search without a query image: an error, no results
                page.locator("#vpdml-search").click()
                page.get_by_text("No query image").first.wait_for(state="visible")
                assert page.locator("#vpdml-results img").count() == 0

                # choose adapter b, pick the first example (a gallery image), search
                page.locator("#vpdml-index input").click()
                page.get_by_role("option", name="b", exact=True).click()
                page.wait_for_function(
                    "() => document.querySelector('#vpdml-about').innerText.startsWith('b:')"
                )
                page.locator("#vpdml-examples img").first.click()
                page.locator("#vpdml-query img").first.wait_for(state="visible")
                page.locator("#vpdml-search").click()
                _assert_shows_first(page, "class_00/0.png", paths["images"] / "class_00" / "0.png")
                table = page.locator("#vpdml-table").inner_text()
                assert "Top 3 in b" in table and table.count(".png") == 3
                assert len(CAPTION.findall(page.locator("#vpdml-results").inner_text())) == 3

                # upload another gallery image through the file input, search again
                upload = paths["images"] / "class_03" / "1.png"
                shown = page.locator("#vpdml-query img").first.get_attribute("src")
                page.locator("#vpdml-query input[type=file]").set_input_files(str(upload))
                page.wait_for_function(
                    "src => { const img = document.querySelector('#vpdml-query img'); return img && img.src !== src; }",
                    arg=shown,
                )
                page.locator("#vpdml-search").click()
                _assert_shows_first(page, "class_03/1.png", upload)
            except Exception:
                page.screenshot(
                    path=str(tmp_path / "failure.png"), full_page=True
                )  # kept by pytest's tmp_path
                raise
            finally:
                browser.close()
    finally:
        demo.close()
