"""A real browser for the dashboard tests: Debian's headless Chromium driven by Playwright, and
the ``browser`` and ``page`` fixtures (a pytest plugin of tests/conftest.py).

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (``apt-get install
chromium``, as ``.ci/run`` does), or ``STICKYCI_CHROMIUM``. Screenshots go to
``STICKYCI_TEST_ARTIFACTS`` when it is set (CI keeps them), else next to the test's files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import IS_ROOT
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = os.environ.get("STICKYCI_CHROMIUM", "/usr/bin/chromium")


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed on exit."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install chromium (as .ci/run "
                           "does), or point STICKYCI_CHROMIUM at one")
    with sync_playwright() as p:
        # Chromium refuses to sandbox itself as root without user namespaces set up for it.
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox"] if IS_ROOT else [])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium per test module; without one the dashboard tests skip, except in CI
    (``CI`` set), where ``.ci/run`` installs it and its absence is a failure."""
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (its own cookies) of 1280x800; a page that opened a dialog (an injected
    ``alert``) fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        p = context.new_page()
        dialogs: list[str] = []
        p.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        yield p
        assert dialogs == []
    finally:
        context.close()


def log_in(page: Page, url: str, token: str, path: str = "/ui/runs") -> None:
    """Open ``path``, which sends the browser to the login form, and enter ``token`` there."""
    page.goto(f"{url}{path}")
    assert "/ui/login" in page.url, page.url
    page.fill("input[name=token]", token)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{url}{path}")


def screenshot(page: Page, name: str, fallback: Path) -> Path:
    """Keep a full-page screenshot as ``NAME.png`` among the test artifacts."""
    where = Path(os.environ.get("STICKYCI_TEST_ARTIFACTS") or fallback)
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
