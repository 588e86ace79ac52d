"""A headless Chromium driven over the Chrome DevTools protocol, for tests of built pages.

Debian's ``chromium`` and ``websocket-client`` (a jupyter-server dependency) are enough:
no driver binary, no download. One browser serves many page loads::

    with HeadlessChromium(profile_dir) as browser:
        page = browser.load(path)             # PageLoad: errors, requests
        browser.evaluate("document.title")
        browser.screenshot(out_png, selector=".gemmalens-attention")

Every page load records what would make a page broken or not self-contained: uncaught
exceptions, ``console.error`` calls, browser log errors (a resource that failed to load)
and every request for something other than a local file or inline data.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib
import shutil
import subprocess
import time
from typing import Any

import websocket

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-extension:", "devtools:")


def chromium_path() -> str | None:
    """The Chromium binary (Debian's ``chromium``), or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclasses.dataclass
class PageLoad:
    url: str
    errors: list[str] = dataclasses.field(default_factory=list)  # exceptions, console errors
    remote_requests: list[str] = dataclasses.field(default_factory=list)  # not file/data


class HeadlessChromium:
    def __init__(self, profile_dir: pathlib.Path, width: int = 1280, height: int = 1600):
        binary = chromium_path()
        if binary is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium).")
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.profile_dir = profile_dir
        self.log_path = profile_dir / "chromium.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]
            + ["about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._ids = 0
        self._events: list[dict[str, Any]] = []
        self._url = "about:blank"
        self.socket = None
        try:
            self.socket = websocket.create_connection(
                self._page_socket_url(self._debugging_port()), timeout=60, suppress_origin=True
            )
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing

    def _debugging_port(self) -> int:
        # Chromium writes the port it chose (and the browser's socket path) to this file.
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if port_file.exists():
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    return int(lines[0])
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            "chromium did not open its DevTools port:\n" + self.log_path.read_text()[-3000:]
        )

    def _page_socket_url(self, port: int) -> str:
        import urllib.request

        local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with local.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise RuntimeError("chromium opened no page.")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Sends a DevTools command and returns its result (events meanwhile are kept)."""
        self._ids += 1
        ident = self._ids
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._events.append(message)

    def _wait_for_event(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self._events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.socket.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self._events.append(json.loads(self.socket.recv()))
            except websocket.WebSocketTimeoutException:
                pass
        self.socket.settimeout(60)

    def _drain(self, seconds: float) -> None:
        """Collects the events of the next ``seconds`` (late script errors, requests)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self._events.append(json.loads(self.socket.recv()))
            except websocket.WebSocketTimeoutException:
                pass
        self.socket.settimeout(60)

    # ------------------------------------------------------------------ pages

    def load(self, path: pathlib.Path, settle: float = 0.5) -> PageLoad:
        """Opens a local file, waits for its load event and ``settle`` seconds more, and
        reports its errors and remote requests so far (`report` gives later ones too)."""
        self._events.clear()
        self._url = path.resolve().as_uri()
        self.call("Page.navigate", url=self._url)
        self._wait_for_event("Page.loadEventFired", timeout=60)
        self._drain(settle)
        return self.report()

    def report(self) -> PageLoad:
        """The errors and remote requests of the page loaded last, up to now."""
        page = PageLoad(self._url)
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details.get("text")
                page.errors.append(f"exception: {text}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                args = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]
                )
                page.errors.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                page.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
            elif method == "Network.requestWillBeSent":
                requested = params["request"]["url"]
                if not requested.startswith(LOCAL_SCHEMES):
                    page.remote_requests.append(requested)
        return page

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: pathlib.Path, selector: str | None = None, margin: int = 8) -> None:
        """Saves a PNG of the viewport, or of the first element matching ``selector``.

        For an element, the viewport is first made as tall as the page, so that the
        element is laid out as it is on screen and captured whole."""
        if selector is None:
            data = self.call("Page.captureScreenshot", format="png")["data"]
            path.write_bytes(base64.b64decode(data))
            return
        width, height = self.evaluate(
            "[document.documentElement.clientWidth, document.documentElement.scrollHeight]"
        )
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        try:
            x, y, w, h = self.evaluate(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()"
            )
            clip = {
                "x": max(0, x - margin),
                "y": max(0, y - margin),
                "width": w + 2 * margin,
                "height": h + 2 * margin,
                "scale": 1,
            }
            data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        finally:
            self.call("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if self.socket is not None:
            # Asked to close, Chromium removes its singleton-socket folder in /tmp, which a
            # terminated one leaves behind.
            try:
                self.call("Browser.close")
                self.process.wait(timeout=10)
            except Exception:  # a browser that is gone or hung is terminated below
                pass
            self.socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
