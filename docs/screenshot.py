"""Screenshot of the viewer page on an image: starts ``nasx serve BUNDLE`` on loopback, uploads IMAGE in
headless Chromium, pairs the strongest box with its card (as a hover would) and saves a PNG.

    python docs/screenshot.py BUNDLE IMAGE -o docs/viewer.png [--heatmap] [--width 1100]

Needs the dev extra (Playwright) and a Chromium binary (``apt-get install chromium`` or
``--browser PATH``).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from nasxserve.serve.local import local_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/viewer.png"))
    p.add_argument("--heatmap", action="store_true", help="overlay the strongest prototype's similarity map")
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = p.parse_args()
    if not a.browser:
        raise SystemExit("no Chromium found: apt-get install chromium, or pass --browser PATH")
    with local_server(a.bundle) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.browser, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": a.width, "height": 900}, device_scale_factor=1)
        page.goto(server.url + "/")
        page.wait_for_selector("#target option >> nth=1", state="attached")
        page.set_input_files("#file", str(a.image))
        page.wait_for_selector("#evidence .card")
        page.locator("#evidence .card").first.hover()
        if a.heatmap:
            page.locator("#evidence .card button.heat").first.click()
            page.wait_for_selector("#heatmap", state="visible")
        page.wait_for_load_state("networkidle")            # the prototype PNGs
        a.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.out), full_page=True)
        browser.close()
    print(a.out)


if __name__ == "__main__":
    main()
