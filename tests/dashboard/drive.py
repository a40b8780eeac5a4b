"""Drives the operator dashboard in headless Chromium for tests/dashboard.rs.

Usage: drive.py BASE_URL. Reads one JSON command per line on stdin and answers each
with one JSON line on stdout: what the browser saw. Waits are bounded (WAIT seconds);
a wait that ends unmet answers {"error": ...} and the Rust test fails on it.
Needs selenium (pip) and Debian's chromium and chromium-driver; downloads nothing.
"""

import json
import os
import sys

os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException, TimeoutException, WebDriverException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT = 20


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("PORTCULLIS_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--window-size=1400,1000"):
        options.add_argument(arg)
    service = Service(os.environ.get("PORTCULLIS_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def visible(d, element_id):
    return d.find_element(By.ID, element_id).is_displayed()


def page(d):
    """What is on screen, and which URLs the page fetched."""
    return {
        "url": d.current_url,
        "login_visible": visible(d, "login"),
        "dashboard_visible": visible(d, "dashboard"),
        "login_error": d.find_element(By.ID, "login-error").text,
        "text": d.find_element(By.TAG_NAME, "body").text,
        "fetched": d.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"),
    }


def steady(d, read):
    """`read(d)` once it reads the page whole: the page redraws its tables on every
    poll, so an element found just before a redraw is stale by the time it is read;
    read again then."""
    def attempt(d):
        try:
            return (read(d),)
        except StaleElementReferenceException:
            return None
    return WebDriverWait(d, WAIT).until(attempt)[0]


def row(d, device):
    return steady(d, lambda d: row_once(d, device))


def row_once(d, device):
    for tr in d.find_elements(By.CSS_SELECTOR, "#devices tbody tr"):
        if tr.get_attribute("data-device") == device:
            cells = {
                c.get_attribute("class").split(" ")[0]: c.text
                for c in tr.find_elements(By.TAG_NAME, "td") if c.get_attribute("class")
            }
            cells["buttons"] = [b.text for b in tr.find_elements(By.TAG_NAME, "button")]
            return cells
    return None


def press(d, row_css, action):
    """Click a row's button. The tables are redrawn on every poll: a row found just
    before a redraw is gone by the click, so find it again."""
    def attempt(d):
        try:
            rows = d.find_elements(By.CSS_SELECTOR, row_css)
            if not rows:
                return False
            rows[0].find_element(By.CSS_SELECTOR, "button[data-action='%s']" % action).click()
            return True
        except StaleElementReferenceException:
            return False
    WebDriverWait(d, WAIT).until(attempt)


def run(d, base, cmd):
    what = cmd["do"]
    wait = WebDriverWait(d, WAIT)
    if what == "open":
        d.get(base + cmd.get("path", "/"))
        wait.until(ec.visibility_of_element_located((By.ID, "login")))
        return page(d)
    if what == "login":
        d.execute_script("performance.clearResourceTimings()")
        field = d.find_element(By.ID, "token")
        field.clear()
        field.send_keys(cmd["token"])
        d.find_element(By.ID, "login-button").click()
        wait.until(lambda d: visible(d, "dashboard") or d.find_element(By.ID, "login-error").text)
        if visible(d, "dashboard"):
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed"))
        return page(d)
    if what == "row":
        want = cmd.get("state")
        wait.until(lambda d: (r := row(d, cmd["id"])) is not None and (want is None or r["state"] == want))
        found = row(d, cmd["id"])
        found["injected"] = d.execute_script(
            "return document.querySelectorAll('#xss, #devices b, #events b, img').length")
        return found
    if what == "click":
        if "reason" in cmd:
            field = d.find_element(By.ID, "reason")
            field.clear()
            field.send_keys(cmd["reason"])
        press(d, "#devices tbody tr[data-device='%s']" % cmd["id"], cmd["action"])
        alert = wait.until(ec.alert_is_present())
        question = alert.text
        if cmd["confirm"]:
            alert.accept()
            wait.until(lambda d: d.find_element(By.ID, "status").text)
        else:
            alert.dismiss()
        status = d.find_element(By.ID, "status").text
        d.execute_script("document.getElementById('status').textContent = ''")
        return {"question": question, "status": status}
    if what == "lift":
        press(d, "#bans tbody tr[data-target='%s']" % cmd["target"], "lift")
        alert = wait.until(ec.alert_is_present())
        question = alert.text
        alert.accept()
        wait.until(lambda d: d.find_element(By.ID, "status").text)
        status = d.find_element(By.ID, "status").text
        d.execute_script("document.getElementById('status').textContent = ''")
        wait.until(lambda d: not d.find_elements(
            By.CSS_SELECTOR, "#bans tbody tr[data-target='%s']" % cmd["target"]))
        return {"question": question, "status": status}
    if what == "wait_login":
        # The page's own polling must find the token refused and go back to the form.
        wait.until(ec.visibility_of_element_located((By.ID, "login")))
        return page(d)
    if what == "rates":
        # Two readings at least, so every rate is a number.
        wait.until(lambda d: steady(d, lambda d: all(
            c.text not in ("", "…")
            for c in d.find_elements(By.CSS_SELECTOR, "#rates td.rate"))))

        def rates(d):
            out = {}
            for tr in d.find_elements(By.CSS_SELECTOR, "#rates tbody tr"):
                out[tr.get_attribute("data-what")] = {
                    "rate": tr.find_element(By.CSS_SELECTOR, "td.rate").text,
                    "total": int(tr.find_element(By.CSS_SELECTOR, "td.total").text),
                }
            return {"rates": out, "census": d.find_element(By.ID, "census").text}
        return steady(d, rates)
    if what == "events":
        wait.until(lambda d: cmd["needle"] in d.find_element(By.ID, "events").text)
        return {"events": d.find_element(By.ID, "events").text}
    if what == "storage":
        return d.execute_script(
            "return {local: localStorage.length, cookie: document.cookie,"
            " session: Object.keys(sessionStorage), url: location.href}")
    if what == "reload":
        d.refresh()
        wait.until(lambda d: visible(d, "login") or visible(d, "dashboard"))
        if visible(d, "dashboard"):
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed"))
        return page(d)
    if what == "logout":
        d.find_element(By.ID, "logout").click()
        wait.until(ec.visibility_of_element_located((By.ID, "login")))
        result = page(d)
        result["session"] = d.execute_script("return Object.keys(sessionStorage)")
        return result
    return {"error": "unknown command %r" % what}


def main():
    base = sys.argv[1]
    try:
        d = browser()
    except WebDriverException as e:
        print(json.dumps({"error": "chromium did not start: %s" % e.msg}), flush=True)
        return 1
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["do"] == "quit":
                break
            try:
                result = run(d, base, cmd)
            except TimeoutException:
                result = {"error": "timed out waiting", "page": page(d)}
            except WebDriverException as e:
                result = {"error": e.msg or repr(e)}
            print(json.dumps(result), flush=True)
    finally:
        d.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
