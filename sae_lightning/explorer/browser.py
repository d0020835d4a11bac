"""A headless Chromium driven over the DevTools protocol, for the explorer's browser test and benchmark.

Streamlit renders over a websocket after the page loads, so `chromium --dump-dom` returns the empty shell;
this driver polls the live DOM until the expected content is there. Needs Debian's `chromium` package.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

LOADED_IMAGES = "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length"
SETTLED = "document.querySelector('[data-testid=stMain]') && !document.querySelector('[data-testid=stSkeleton]')"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    """Headless Chromium driven over the DevTools protocol (the page renders over a websocket, so the DOM
    is polled until the expected content is there; --dump-dom alone returns the empty shell)."""

    def __init__(self, binary: str) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp()
        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu",
                                      "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                                      "--window-size=1400,1100", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        end = time.time() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > end or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression (a DOM node comes back as true/false)."""
        expression = f"(v => v instanceof Node ? true : v)({expression})"
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        end = time.time() + timeout
        while time.time() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"the page never satisfied {expression}; it shows:\n{self.js('document.body.innerText')}")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, text: str, timeout: float = 60) -> None:
        """Click the (enabled) button labelled `text`, once it is there."""
        button = (f"[...document.querySelectorAll('button')].find(b => b.innerText.trim() === {json.dumps(text)} "
                  f"&& !b.disabled)")
        self.wait_for(f"!!{button}", timeout)
        self.js(f"{button}.click()")

    def click_at(self, selector: str) -> None:
        """A real mouse click (move, press, release) at the centre of the first element matching `selector`."""
        element = f"document.querySelector({json.dumps(selector)})"
        self.wait_for(f"!!{element}")
        self.js(f"{element}.scrollIntoView({{block: 'center'}})")
        x, y, w, h = self.js(f"(r => [r.x, r.y, r.width, r.height])({element}.getBoundingClientRect())")
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + w / 2, y=y + h / 2)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x + w / 2, y=y + h / 2, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def upload(self, path: Path, selector: str = "input[type=file]") -> None:
        """Put a file into a file input, as choosing it in the dialog does."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
