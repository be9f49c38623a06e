"""The fleet's status page in a real browser: Debian's Chromium, headless, driven by Playwright,
against two daemon processes sharing the session's beanstalkd and Redis."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Dialog, Locator, Page, async_playwright, expect

from tests.helpers import Daemons, Env, wait_until, write_config
from uploader.dev.servers import free_port

TOKEN = "browser-token-7"
XSS = "<img src=x onerror=alert(1)>.jpg"
SEEN = 20_000  # ms the page may take to show a change: a poll is every 2 s, a beat every 5 s


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: scripts/setup.sh installs it")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            await browser.close()


def row(page: Page, table: str, job_id: str) -> Locator:
    return page.locator(f"#{table} tbody tr").filter(has=page.locator("td:first-child", has_text=re.compile(
        f"^{re.escape(job_id)}$")))


async def settled_of(page: Page, job_id: str) -> int:
    cell = page.locator("#active tbody tr", has_text=job_id).locator("td").nth(3)
    return int((await cell.inner_text()).split("/")[0])


@pytest.mark.timeout(150)
async def test_the_status_page_shows_the_fleet_and_its_actions_work(
    env: Env, daemons: Daemons, chromium: Browser, tmp_path: Path
) -> None:
    slow_tube = f"slow-{env.tag}"
    bases = []
    for i in range(2):
        port = free_port()
        bases.append(f"http://127.0.0.1:{port}")
        config = write_config(tmp_path / f"daemon{i}.toml", env.config_data(
            source={"tubes": [env.tube, slow_tube]},
            http={"listen": f"127.0.0.1:{port}", "token": TOKEN},
            limits={"tubes": {slow_tube: {"files_per_second": 4}}},
        ))
        daemons.start(config)
    for daemon in daemons.started:
        await daemon.wait_event("ready")
    files = env.write_files(64)
    missing = env.uploads / XSS
    await env.push_job("done1", [str(f) for f in files[:2]])
    await env.push_job("bad1", [str(files[2]), str(missing)])
    assert (await env.wait_final("done1"))["state"] == "done"
    assert (await env.wait_final("bad1"))["state"] == "failed"
    await env.push_job("slow1", [str(f) for f in files[4:64]], tube=slow_tube)

    stranger = await chromium.new_page()
    await stranger.goto(bases[1])
    await expect(stranger.locator("#login")).to_be_visible()
    await expect(stranger.locator("#fleet")).to_be_hidden()
    for job_id in ("done1", "bad1", "slow1"):
        assert job_id not in await stranger.content()
    assert await stranger.evaluate("fetch('/fleet').then(r => r.status)") == 401
    refused = await stranger.evaluate(
        "fetch('/jobs/slow1/cancel', {method: 'POST', headers: {'X-Confirm': 'cancel'}}).then(r => r.status)")
    assert refused == 401

    page = await chromium.new_page(viewport={"width": 1280, "height": 1000})
    alerts: list[str] = []
    answered: list[asyncio.Task[None]] = []

    def on_dialog(dialog: Dialog) -> None:
        if dialog.type != "confirm":
            alerts.append(dialog.message)
        answered.append(asyncio.ensure_future(dialog.accept()))

    page.on("dialog", on_dialog)
    await page.goto(bases[0])
    await page.fill("#login input[name=token]", TOKEN)
    await page.click("#login button")
    await expect(page.locator("#fleet")).to_be_visible()
    await expect(page.locator("#workers tbody tr")).to_have_count(2, timeout=SEEN)
    await expect(page.locator("#workers tbody")).to_contain_text(f":{daemons.started[1].proc.pid}")  # type: ignore[union-attr]

    await expect(row(page, "active", "slow1")).to_have_count(1, timeout=SEEN)
    first = await settled_of(page, "slow1")
    await wait_until(lambda: moved(page, first), SEEN / 1000, "the running job's progress to move")
    await expect(row(page, "finished", "done1").locator("td").nth(1)).to_have_text("done")
    failed = row(page, "failed", "bad1")
    await expect(failed).to_contain_text(f"{missing}: ")
    assert await page.locator("main img").count() == 0 and alerts == []
    await expect(page.locator("#chart figure")).to_have_count(2)  # files/s and bytes/s
    await expect(page.locator("#chart figure").first.locator("rect")).to_have_count(60)
    heights = await page.locator("#chart rect").evaluate_all(
        "rects => rects.map(r => +r.getAttribute('height'))")
    assert max(heights) > 0
    shot = await page.screenshot(full_page=True)
    for where in (str(tmp_path / "status-page.png"), os.environ.get("UPLOADER_SCREENSHOT")):
        if where:  # README.md's picture: UPLOADER_SCREENSHOT=docs/status-page.png
            await asyncio.to_thread(Path(where).write_bytes, shot)

    await page.fill("#search-id", "bad1")
    await page.click("#search button")
    await expect(page.locator("#found-failures")).to_contain_text(XSS)
    missing.write_text("it is here now")
    await failed.locator("button[data-action=retry]").click()
    await expect(page.locator("#banner")).to_contain_text("kicked bad1")
    await expect(row(page, "failed", "bad1")).to_have_count(0, timeout=SEEN)
    await expect(row(page, "finished", "bad1").locator("td").nth(1)).to_have_text("done", timeout=SEEN)
    await row(page, "active", "slow1").locator("button[data-action=cancel]").click()
    assert (await env.wait_final("slow1"))["state"] == "cancelled"
    assert alerts == []


async def moved(page: Page, first: int) -> bool:
    return await settled_of(page, "slow1") > first
