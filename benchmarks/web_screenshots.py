"""Screenshots of the playground and the live dashboard of `ember serve`, in headless Chromium.

    .venv/bin/python benchmarks/web_screenshots.py                 # starts its own server
    .venv/bin/python benchmarks/web_screenshots.py --url http://127.0.0.1:8000

Writes benchmarks/results/web/{playground,playground_phone,dashboard,dashboard_phone}.png: the
playground after one streamed chat answer (tokens coloured by probability, the alternatives of
one token shown), and the dashboard after ~20 s of background load (--streams concurrent
streams, default 8).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
from playwright.sync_api import Page, sync_playwright

OUT = Path(__file__).resolve().parent / "results" / "web"
CHROMIUM = "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ember = Path(sys.executable).with_name("ember")
    proc = subprocess.Popen([str(ember), "serve", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"], env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ember serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("ember serve did not become ready in 300 s")


def playground(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    page.fill("#system", "You are a concise assistant.")
    page.fill("#max_tokens", "60")
    page.fill("#seed", "1")
    page.fill("#prompt", "Give me three tips for writing clear documentation.")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .figures')"
                           "?.textContent.length > 0", timeout=120_000)
    page.hover(".msg.assistant .tok >> nth=6")
    page.wait_for_selector("#tooltip:not([hidden])")


def load(url: str, stop: threading.Event) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("EMBER_API_KEY", "x"),
                           max_retries=0)
    while not stop.is_set():
        stream = client.completions.create(model="", prompt="Once upon a time", max_tokens=96,
                                           stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            if stop.is_set():
                stream.close()
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--load-seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=8, help="concurrent background streams")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport=DESKTOP)
            playground(page, url)
            page.screenshot(path=OUT / "playground.png")
            page.set_viewport_size(PHONE)
            page.screenshot(path=OUT / "playground_phone.png", full_page=True)
            page.set_viewport_size(DESKTOP)

            stop = threading.Event()
            workers = [threading.Thread(target=load, args=(url, stop))
                       for _ in range(args.streams)]
            page.goto(url + "/dashboard")
            for worker in workers:
                worker.start()
                time.sleep(0.3)
            page.wait_for_timeout(args.load_seconds * 1000)
            page.screenshot(path=OUT / "dashboard.png", full_page=True)
            page.set_viewport_size(PHONE)
            page.wait_for_timeout(1500)
            page.screenshot(path=OUT / "dashboard_phone.png", full_page=True)
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
            browser.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"screenshots in {OUT} (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
