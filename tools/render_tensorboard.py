"""Render a run's TensorBoard page in headless Chromium and save a screenshot.

    python tools/render_tensorboard.py runs/demo docs/tensorboard.png              # the custom-scalars overview
    python tools/render_tensorboard.py runs/demo /tmp/hp.png --page hparams        # another dashboard

Starts ``tensorboard --logdir LOGDIR`` on a free localhost port, opens ``http://127.0.0.1:PORT/#custom_scalars``
(``--page``) in headless Chromium driven over the DevTools protocol, waits until the charts have drawn their lines
(or ``--timeout`` seconds), saves ``OUT.png`` and prints the layout that the custom-scalars plugin served (category
and chart titles in page order) and how many charts the page drew. Only localhost traffic; TensorBoard and the
browser are stopped on exit.

Needs a Chromium binary (``apt-get install -y chromium``; or ``--chromium PATH``) and the ``websockets`` package.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

#: JavaScript: the number of chart cards on the page and how many of them drew a line (TensorBoard's Polymer
#: dashboards live in nested shadow roots, so the search walks them)
_COUNT_CHARTS = r"""
(() => {
  const all = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) { all.push(el); if (el.shadowRoot) walk(el.shadowRoot); }
  };
  walk(document);
  const cards = all.filter(e => /-chart-card$|^tf-scalar-card$/.test(e.localName));
  const inside = (card) => { const out = []; const w = (r) => { for (const el of r.querySelectorAll('*')) {
      out.push(el); if (el.shadowRoot) w(el.shadowRoot); } }; w(card.shadowRoot || card); return out; };
  const drawn = cards.filter(c => inside(c).some(e => e.localName === 'path' &&
      (e.getAttribute('d') || '').length > 20 || e.localName === 'canvas' && e.width > 0)).length;
  return JSON.stringify({cards: cards.length, drawn: drawn});
})()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310  (localhost only)
        return json.loads(r.read().decode())


def _wait(fn, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            out = fn()
            if out:
                return out
        except Exception as e:  # noqa: BLE001  (not up yet)
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f" ({last})" if last else ""))


@contextmanager
def tensorboard_server(logdir: str | Path, timeout: float = 60.0):
    """``tensorboard --logdir logdir`` on a free localhost port; yields its base URL once every run is loaded."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: not _dead(proc) and get_json(url + "/data/runs"), timeout, "tensorboard")
        yield url
    finally:
        _stop(proc)


def _stop(proc) -> None:
    """Terminate a child process, killing it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _dead(proc) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"tensorboard exited with code {proc.returncode}: {proc.stderr.read()[-500:]}")
    return False


def served_layout(url: str) -> list[tuple[str, list[str]]]:
    """The custom-scalars layout as the plugin serves it: ``[(category, [chart title, ...]), ...]``."""
    layout = get_json(url + "/data/plugin/custom_scalars/layout")
    return [(c.get("title", ""), [ch.get("title", "") for ch in c.get("chart", [])])
            for c in layout.get("category", [])]


class _CDP:
    """Minimal Chrome DevTools Protocol client over one page target's websocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})


def find_chromium(explicit: str | None = None) -> str:
    for name in ([explicit] if explicit else []) + ["chromium", "chromium-browser", "google-chrome", "chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise SystemExit("render_tensorboard: error: no Chromium found; apt-get install -y chromium, or --chromium PATH")


def screenshot(page_url: str, out: str | Path, chromium: str, width: int = 1600, height: int = 1800,
               timeout: float = 90.0) -> dict:
    """Open ``page_url`` in headless Chromium, wait until every chart card drew a line (stable for 2 s) or
    ``timeout``, save a PNG; returns ``{"cards": N, "drawn": M}``."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="render_tb_")
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--remote-debugging-port={port}", "--remote-allow-origins=*",
           f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = _wait(lambda: [t for t in get_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"],
                        30, "chromium")
        from websockets.sync.client import connect

        with connect(targets[0]["webSocketDebuggerUrl"], max_size=64 * 2 ** 20, open_timeout=30) as ws:
            return _capture(_CDP(ws), page_url, out, width, height, timeout)
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def _capture(cdp: _CDP, page_url: str, out: str | Path, width: int, height: int, timeout: float) -> dict:
    """Navigate, poll the chart counts until every card drew and nothing changed for 2 s, write the PNG."""
    cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    cdp.call("Page.enable")
    cdp.call("Page.navigate", url=page_url)
    deadline, counts, stable_since = time.monotonic() + timeout, {"cards": 0, "drawn": 0}, None
    while time.monotonic() < deadline:
        res = cdp.call("Runtime.evaluate", expression=_COUNT_CHARTS, returnByValue=True)
        now = json.loads(res.get("result", {}).get("value") or "{}") or counts
        if now != counts:
            counts, stable_since = now, time.monotonic()
        elif counts["cards"] and counts["drawn"] == counts["cards"] and time.monotonic() - stable_since > 2:
            break
        time.sleep(0.5)
    time.sleep(1.0)  # let the last transitions finish
    png = cdp.call("Page.captureScreenshot", format="png")["data"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(base64.b64decode(png))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logdir")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--page", default="custom_scalars", help="dashboard (URL fragment), e.g. scalars, hparams")
    p.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH)")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1800)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the charts")
    args = p.parse_args(argv)
    if not Path(args.logdir).is_dir():
        raise SystemExit(f"render_tensorboard: error: logdir: no directory '{args.logdir}'")
    chromium = find_chromium(args.chromium)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tensorboard_server(args.logdir) as url:
        for category, charts in served_layout(url):
            print(f"{category}: {' | '.join(charts)}")
        counts = screenshot(f"{url}/#{args.page}", args.out, chromium, args.width, args.height, args.timeout)
    print(f"{args.out}: {counts['drawn']} of {counts['cards']} chart cards drew data")
    return 0 if counts["cards"] else 1


if __name__ == "__main__":
    sys.exit(main())
