"""Screenshots of the built site in headless Chromium, to look at what readers will see.

    mkdocs build --strict && python docs/scripts/screenshots.py site/ screenshots/

Serves the built folder on localhost and saves a full-page PNG of the home page, a concept
page, a rendered notebook and an API page. Needs Debian's chromium and chromium-driver
(`apt-get install chromium chromium-driver`) and `pip install selenium`; offline flags as the
machine's notes require (no background networking).
"""

import argparse
import functools
import http.server
import threading
from pathlib import Path

from selenium import webdriver

PAGES = {
    "home": "",
    "concept": "concepts/lora-update/",
    "notebook": "notebooks/02_intrinsic_rank/",
    "api": "reference/lora/",
    "claims": "claims/",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site folder")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(args.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"),
                              options=options)  # fmt: skip
    try:
        for name, path in PAGES.items():
            driver.set_window_size(args.width, 1000)
            driver.get(f"http://127.0.0.1:{server.server_port}/{path}")
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(args.width, min(height, 6000))
            driver.save_screenshot(str(args.out / f"{name}.png"))
            print(f"{name}: {path} ({height} px tall)")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
