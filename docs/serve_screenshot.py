"""Make docs/serve.png: `imgvec serve` on packaged real photos (augmented copies) embedded with the default,
pretrained efficientnetlite0, driven by headless Chromium (Playwright): a search from a picked image, then
from one of its results, with the map of the store above them and one of its points hovered.

    python docs/serve_screenshot.py [docs/serve.png]

Needs the system Chromium at /usr/bin/chromium and `pip install playwright` (no `playwright install`).
"""

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import imgvec
from imgvec.synthetic import make_photo_folder

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("serve.png")).resolve()
work = Path(tempfile.mkdtemp(prefix="imgvec-serve-shot-"))
classes = ("cat", "coffee", "astronaut", "rocket", "temple", "flower")
make_photo_folder(work / "photos", per_class=8, size=224, classes=classes, seed=0)
make_photo_folder(work / "query", per_class=1, size=224, classes=classes, seed=5)
imgvec.embed([work / "photos"], work / "photos.h5")  # efficientnetlite0, pretrained (installed with imgvec)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "imgvec", "serve", "photos.h5", "--port", str(port), "-k", "8"],
                          stderr=subprocess.PIPE, text=True, cwd=work)
print(server.stderr.readline(), end="")

from playwright.sync_api import sync_playwright  # noqa: E402

try:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--no-proxy-server"])
        page = browser.new_page(viewport={"width": 1280, "height": 560}, bypass_csp=True)
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#file", str(next((work / "query" / "coffee").iterdir())))
        page.wait_for_selector("figure.hit >> nth=7")
        page.locator("figure.hit").nth(3).click()  # search from a result, as a user would
        page.wait_for_function("document.querySelector('#results h2').textContent.includes('/')")
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
        page.wait_for_selector("#map circle")
        page.locator("#map circle.hit").first.hover(force=True)  # a point of a result: its thumbnail beside it
        page.wait_for_function("(document.querySelector('#preview img') || {}).complete")
        page.screenshot(path=str(out), full_page=True)
        browser.close()
finally:
    server.terminate()
print(f"wrote {out}")
