"""A real headless browser for tests: Debian's ``chromium``, driven over the DevTools protocol.

:func:`open_page` starts chromium on 127.0.0.1 (its own profile folder, no
network services), loads one page, and returns what the browser built: the
value of a JavaScript expression evaluated in the page, the console errors
and uncaught exceptions, every URL the page requested, and a screenshot. The
browser is stopped by its pid, always. The websocket client is aiohttp's (a
dependency of the test extra through s3fs).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@dataclass
class Page:
    value: object  # what the expression evaluated to (JSON-able)
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    screenshot: bytes = b""


def _start(profile: str, timeout_s: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = os.path.join(profile, "DevToolsActivePort")  # chromium writes its port here
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools came up")
        try:
            with open(port_file) as f:
                port = int(f.readline())
            return proc, port
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


def _page_socket(port: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
            page = next(t for t in targets if t.get("type") == "page")
            return page["webSocketDebuggerUrl"]
        except (OSError, StopIteration, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _drive(ws_url: str, url: str, expression: str, size: tuple[int, int], timeout_s: float) -> Page:
    import aiohttp

    page = Page(None)
    pending: dict[int, asyncio.Future] = {}
    loaded = asyncio.Event()
    counter = iter(range(1, 1 << 30))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:

            async def reader():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    m = json.loads(msg.data)
                    if "id" in m and m["id"] in pending:
                        pending.pop(m["id"]).set_result(m)
                        continue
                    method, p = m.get("method"), m.get("params", {})
                    if method == "Page.loadEventFired":
                        loaded.set()
                    elif method == "Runtime.exceptionThrown":
                        d = p["exceptionDetails"]
                        page.errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
                    elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                        page.errors.append("console: " + " ".join(str(a.get("value", a)) for a in p.get("args", [])))
                    elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                        page.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
                    elif method == "Network.requestWillBeSent":
                        page.requests.append(p["request"]["url"])

            async def send(method: str, **params):
                i = next(counter)
                pending[i] = asyncio.get_running_loop().create_future()
                await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
                reply = await asyncio.wait_for(pending[i], timeout_s)
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

            task = asyncio.create_task(reader())
            try:
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await send(f"{domain}.enable")
                w, h = size
                await send("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
                await send("Page.navigate", url=url)
                await asyncio.wait_for(loaded.wait(), timeout_s)
                await asyncio.sleep(0.2)  # let the page's script and image decodes settle
                result = await send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
                if "exceptionDetails" in result:
                    raise RuntimeError(f"the check expression failed: {result['exceptionDetails']}")
                page.value = result["result"].get("value")
                shot = await send("Page.captureScreenshot", format="png")
                page.screenshot = base64.b64decode(shot["data"])
            finally:
                task.cancel()
    return page


def open_page(url: str, expression: str, size=(1280, 1600), timeout_s: float = 30.0) -> Page:
    """Load ``url`` in a fresh headless chromium, evaluate ``expression`` there, take a screenshot."""
    profile = tempfile.mkdtemp(prefix="edje-chromium-")
    proc = None
    try:
        proc, port = _start(profile, timeout_s)
        ws_url = _page_socket(port, timeout_s)
        return asyncio.run(_drive(ws_url, url, expression, size, timeout_s))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def non_local_requests(requests: list[str]) -> list[str]:
    """Requests a self-contained page must not make: anything but its own file and inline data."""
    return [u for u in requests if not re.match(r"^(file:|data:|about:)", u)]
