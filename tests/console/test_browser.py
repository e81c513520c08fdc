"""The console in a real browser: Debian's headless Chromium driven by Playwright (no browser
download: `executable_path` points at the system binary). Screenshots land in the test's tmp
folder (and, with UNIMEDVL_SCREENSHOTS=DIR, in DIR too: that is how docs/img was made)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.console.conftest import ADMIN, READER

pytestmark = [pytest.mark.browser, pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or require_tool("chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, artefacts: Path, name: str) -> None:
    path = artefacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("UNIMEDVL_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def _login(browser: Any, live: Any, user: tuple[str, str]) -> Any:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    page.goto(f"{live.url}/studies/1")  # not logged in: the login form, coming back here after
    assert "/login" in page.url
    page.fill("input[name=username]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("button[type=submit]")
    page.wait_for_url(f"{live.url}/studies/1", timeout=15_000)
    return page


def test_readonly_user_cannot_retry(browser: Any, live: Any, scenario: Any, artefacts: Path) -> None:
    page = _login(browser, live, READER)
    assert "failed" in page.locator(f"#job-{scenario.failed_job}").inner_text()
    assert page.locator("button.retry").count() == 0  # a failed job, but no retry button for this role
    # Even a hand-made request with the user's own CSRF token is refused.
    csrf = page.input_value("header input[name=csrf_token]")
    status = page.evaluate(
        """([id, csrf]) => fetch(`/jobs/${id}/retry`, {method: 'POST', headers: {'X-CSRF-Token': csrf}})
           .then(r => r.status)""",
        [scenario.failed_job, csrf],
    )
    assert status == 403
    page.goto(f"{live.url}/jobs?state=failed")
    _shot(page, artefacts, "console-readonly-jobs")
    page.context.close()


def test_admin_sees_failure_reason_and_seg_overlay_then_retries(
    browser: Any, live: Any, scenario: Any, artefacts: Path
) -> None:
    page = _login(browser, live, ADMIN)
    page.goto(f"{live.url}/")
    dashboard = page.inner_text("main")
    assert "jobs failed: 1" in dashboard and "cannot decode pixel data" in dashboard
    assert "test-worker:1" in dashboard and "cpu float32" in dashboard  # the worker, its device
    _shot(page, artefacts, "console-dashboard")
    page.goto(f"{live.url}/studies/1")
    assert page.inner_text("#study-uid") == scenario.study_uid
    failed = page.locator(f"#job-{scenario.failed_job}")
    assert "failed" in failed.inner_text() and "cannot decode pixel data" in failed.inner_text()
    seg_row = page.locator(f"#job-{scenario.seg_job}")
    assert "done" in seg_row.inner_text() and "pacs: done" in seg_row.inner_text()
    overlay = page.locator("img.preview-seg").first
    overlay.wait_for(timeout=15_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(), timeout=15_000)
    # The outline is drawn in colour: the thumbnail has red pixels a grey CT never has.
    red = page.evaluate(
        """img => { const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i+1] < 90 && d[i+2] < 90) n++;
        return n; }""",
        overlay.element_handle(),
    )
    assert red > 0
    assert "Volume" in page.inner_text(".sr") or "Area" in page.inner_text(".sr")  # the TID 1500 SR, as text
    _shot(page, artefacts, "console-study")
    failed.locator("button.retry").click()
    page.wait_for_selector(".flash", timeout=15_000)
    assert f"job {scenario.failed_job} re-queued" in page.inner_text(".flash")
    assert "planned" in page.locator(f"#job-{scenario.failed_job}").inner_text()
    page.context.close()
