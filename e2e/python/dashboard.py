"""Drives the dashboard in headless Chromium for e2e/tests/e2e/dashboard.rs.

The test sends one JSON command a line on stdin and reads one JSON answer a line on stdout;
it decides what to assert, this script only works the browser. Every wait is bounded by the
command's own timeout.

Usage: dashboard.py --spki-hash BASE64 --artifacts DIR
  --spki-hash: the SHA-256 of the API server's public key (base64): Chromium accepts that one
  certificate (the test cloud's own CA is in no trust store), and no other.
"""

import argparse
import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

# The cells of the list's row named arguments[0], by column, or null.
ROW = """
const tr = [...document.querySelectorAll('#list tbody tr')]
  .find((r) => r.dataset.name === arguments[0]);
if (!tr) return null;
const cells = {};
for (const td of tr.children) cells[td.dataset.col] = td.textContent;
return cells;
"""


def browser(spki_hash, data_dir):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        # As root, Chromium runs only without its sandbox.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        f"--user-data-dir={data_dir}",
        f"--ignore-certificate-errors-spki-list={spki_hash}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def wait(timeout, probe):
    """Polls probe() until it returns something other than None; (value, ms) or (None, ms)."""
    start = time.monotonic()
    while True:
        value = probe()
        ms = int((time.monotonic() - start) * 1000)
        if value is not None or ms > timeout * 1000:
            return value, ms
        time.sleep(0.05)


def run(driver, cmd, artifacts):
    op = cmd["cmd"]
    timeout = float(cmd.get("timeout", 30))
    if op == "open":
        driver.get(cmd["url"])
        return {"ok": True, "url": driver.current_url}
    if op == "type":
        field = driver.find_element(By.CSS_SELECTOR, cmd["css"])
        field.clear()
        field.send_keys(cmd["text"])
        return {"ok": True}
    if op == "click":
        driver.find_element(By.CSS_SELECTOR, cmd["css"]).click()
        return {"ok": True}
    if op == "select":
        driver.execute_script(
            "const s = document.querySelector(arguments[0]); s.value = arguments[1];"
            "s.dispatchEvent(new Event('change'));",
            cmd["css"],
            cmd["value"],
        )
        return {"ok": True}
    if op == "row":
        return {"ok": True, "cells": driver.execute_script(ROW, cmd["name"])}
    if op == "wait_row":
        # Until the row exists and, when asked, its cell `col` reads `value`.
        col, want = cmd.get("col"), cmd.get("value")
        last = {}

        def probe():
            cells = driver.execute_script(ROW, cmd["name"])
            last["cells"] = cells
            if cells is not None and (col is None or cells.get(col) == want):
                return cells
            return None

        cells, ms = wait(timeout, probe)
        return {"ok": cells is not None, "ms": ms, "cells": last.get("cells")}
    if op == "wait_js":
        # Until the script returns something other than null or false.
        def probe():
            v = driver.execute_script(cmd["js"])
            return None if v is None or v is False else v

        value, ms = wait(timeout, probe)
        return {"ok": value is not None, "ms": ms, "value": value}
    if op == "js":
        return {"ok": True, "value": driver.execute_script(cmd["js"])}
    if op == "screenshot":
        os.makedirs(artifacts, exist_ok=True)
        path = os.path.join(artifacts, f"{cmd['name']}.png")
        driver.save_screenshot(path)
        return {"ok": True, "path": path}
    if op == "offline":
        # The browser's network cut (or restored) through the DevTools protocol: requests in
        # flight fail, as when a laptop loses its Wi-Fi.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": bool(cmd["on"]), "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        return {"ok": True}
    if op == "url":
        return {"ok": True, "url": driver.current_url}
    raise ValueError(f"unknown command {op!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spki-hash", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--profile", required=True)
    args = parser.parse_args()
    driver = browser(args.spki_hash, args.profile)
    try:
        print(json.dumps({"ok": True, "ready": driver.capabilities.get("browserVersion")}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            try:
                answer = run(driver, cmd, args.artifacts)
            except (WebDriverException, KeyError, ValueError) as e:
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(answer), flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
