#!/usr/bin/env python3
"""Browser test for the Tollgate chargeback dashboard.

Drives headless Chromium (Debian's /usr/bin/chromium + /usr/bin/chromedriver, never a
downloaded one) against a running admin server and compares what the page shows with
what the admin API returns for the same filters.

    python3 tests/browser/dashboard_test.py --url http://127.0.0.1:9091 --token TOKEN \
        --from 2026-11-01 --to 2026-11-27 --screenshot docs/dashboard.png

Prints one line per passed check; exits 0 when all pass, 1 on a failed check,
2 when the browser or the server cannot be reached.
"""
import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

# Keep selenium-manager from ever reaching the network: the driver path is given below.
os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class CheckFailed(Exception):
    pass


def check(cond, message):
    if not cond:
        raise CheckFailed(message)


def passed(message):
    print(f"PASS {message}", flush=True)


def label(v):
    """How the page names a group value; null groups are shown as '(none)'."""
    return "(none)" if v is None or v == "" else str(v)


class Api:
    def __init__(self, base, token):
        self.base, self.token = base.rstrip("/"), token

    def get_bytes(self, path, **params):
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
        req = urllib.request.Request(f"{self.base}{path}{'?' + query if query else ''}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.read()
        except urllib.error.HTTPError as e:
            raise CheckFailed(f"API {path} {params} returned HTTP {e.code}: {e.read()[:300]!r}") from e

    def get(self, path, **params):
        return json.loads(self.get_bytes(path, **params))


class Dashboard:
    def __init__(self, driver, args):
        self.d, self.args = driver, args
        self.timeout = args.timeout

    def js(self, script, *a):
        return self.d.execute_script(script, *a)

    def wait(self, cond, what):
        try:
            return WebDriverWait(self.d, self.timeout, poll_frequency=0.1).until(lambda d: cond())
        except TimeoutException:
            raise CheckFailed(f"timed out after {self.timeout}s waiting for {what}")

    def wait_ready(self, frm, to, tenant, stack):
        """Waits until every panel has loaded for exactly these filters."""
        want = f"{frm}|{to}|{tenant}|{stack}"
        self.wait(lambda: self.js("return document.body.dataset.filters") == want
                  and self.js("return document.body.dataset.state") in ("ready", "error"),
                  f"the dashboard to load filters {want}")
        if self.js("return document.body.dataset.state") != "ready":
            errors = self.js("""return [...document.querySelectorAll('.panel-status, #filter-error')]
                .map(e => e.textContent).filter(Boolean)""")
            raise CheckFailed(f"dashboard ended in an error state for {want}: {errors}")

    def attr(self, css, name):
        return self.d.find_element(By.CSS_SELECTOR, css).get_attribute(name)

    def rects(self):
        return self.js("""return [...document.querySelectorAll('#spend-chart rect')]
            .map(r => [r.dataset.day, r.dataset.series, Number(r.dataset.costMicros)])""")

    def budgets(self):
        return self.js("""return [...document.querySelectorAll('#budgets [data-budget-id]')]
            .map(b => [b.dataset.tenant, b.dataset.budgetId, Number(b.dataset.used), Number(b.dataset.limit)])""")

    def resources_outside(self, origin):
        names = self.js("return performance.getEntriesByType('resource').map(e => e.name)")
        return [n for n in names if not n.startswith(origin + "/")]


def wait_download(directory, name, timeout):
    path = Path(directory) / name
    deadline = time.time() + timeout
    while time.time() < deadline:
        partial = any(p.suffix == ".crdownload" for p in Path(directory).iterdir())
        if path.exists() and not partial:
            return path.read_bytes()
        time.sleep(0.1)
    raise CheckFailed(f"no download named {name} appeared in {directory} "
                      f"(found: {sorted(p.name for p in Path(directory).iterdir())})")


def full_page_screenshot(driver, path):
    """Chrome's WebDriver screenshot is viewport-only; the DevTools protocol can capture the whole page."""
    m = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = m.get("cssContentSize") or m["contentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(base64.b64decode(shot["data"]))


def make_driver(download_dir):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {
        "download.default_directory": download_dir,
        "download.prompt_for_download": False,
        "download.directory_upgrade": True,
    })
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    # Headless Chrome sometimes ignores the download prefs; the DevTools call makes it explicit.
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": download_dir})
    except WebDriverException:
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": download_dir})
    return driver


def run(args, driver, download_dir):
    api = Api(args.url, args.token)
    page = Dashboard(driver, args)
    origin = urllib.parse.urlsplit(args.url)
    origin = f"{origin.scheme}://{origin.netloc}"
    frm, to = args.date_from, args.date_to
    by = By.CSS_SELECTOR

    # ---- (a) login
    driver.get(args.url.rstrip("/") + "/")
    page.wait(lambda: driver.find_element(By.ID, "login").is_displayed(), "the login form")
    check(not driver.find_element(By.ID, "dashboard").is_displayed(), "dashboard visible before login")
    passed("a1 / shows the login form")

    driver.find_element(By.ID, "token").send_keys("wrong-" + args.token)
    driver.find_element(By.ID, "login-submit").click()
    page.wait(lambda: driver.find_element(By.ID, "login-error").text.strip() != "", "an error for a wrong token")
    check(driver.find_element(By.ID, "login").is_displayed(), "login form hidden after a wrong token")
    check(page.js("return document.body.dataset.state") == "login", "page not in login state after a wrong token")
    passed(f"a2 wrong token is rejected: {driver.find_element(By.ID, 'login-error').text.strip()!r}")

    driver.find_element(By.ID, "token").send_keys(args.token)
    driver.find_element(By.ID, "login-submit").click()
    page.wait(lambda: page.js("return document.body.dataset.state") in ("ready", "error", "login"), "the first load")
    check(driver.find_element(By.ID, "dashboard").is_displayed(),
          f"dashboard not shown after signing in with --token (login error: "
          f"{driver.find_element(By.ID, 'login-error').text.strip()!r})")
    # Date inputs are set through the DOM: typing into <input type=date> depends on the browser locale.
    page.js("""for (const [id, v] of [['from', arguments[0]], ['to', arguments[1]]]) {
        const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); }""", frm, to)
    page.wait_ready(frm, to, "", "tenant")
    check(page.attr("#from", "value") == frm and page.attr("#to", "value") == to, "date inputs do not hold from/to")
    passed(f"a3 right token loads the dashboard for {frm}..{to}")

    outside = page.resources_outside(origin)
    check(not outside, f"page requested resources outside {origin}: {outside}")
    passed(f"a4 every resource the page loaded is under {origin}")

    # ---- (b) numbers equal the API's (all tenants)
    usage = api.get("/admin/usage", **{"from": frm, "to": to, "group_by": "day,tenant"})
    total = usage["totals"]["cost_micros"]
    shown = int(page.attr("#total-spend", "data-cost-micros"))
    check(shown == total, f"total-spend data-cost-micros {shown} != API totals.cost_micros {total}")
    reqs = int(driver.find_element(By.ID, "total-requests").text.replace(",", ""))
    check(reqs == usage["totals"]["requests"], f"total-requests {reqs} != API {usage['totals']['requests']}")
    passed(f"b1 totals match the API: {total} micros, {reqs} requests")

    rects = page.rects()
    rect_sum = sum(r[2] for r in rects)
    check(rect_sum == total, f"spend-chart segments sum to {rect_sum} micros, API total is {total}")
    want = sorted((r["day"], label(r["tenant"]), r["cost_micros"]) for r in usage["data"])
    check(sorted(map(tuple, rects)) == want, "spend-chart segments differ from API rows (day, tenant, cost)")
    passed(f"b2 spend chart: {len(rects)} segments equal the API rows and sum to the total")

    budgets = api.get("/admin/budgets")["data"]
    shown_b = {(t, i): (u, lim) for t, i, u, lim in page.budgets()}
    check(len(shown_b) == len(budgets), f"{len(shown_b)} budget bars shown, API has {len(budgets)}")
    for b in budgets:
        got = shown_b.get((b["tenant"], b["id"]))
        check(got == (b["used"], b["limit"]),
              f"budget {b['tenant']}/{b['id']}: page used/limit {got} != API {(b['used'], b['limit'])}")
    passed(f"b3 {len(budgets)} budget bars match the API used/limit")

    routing = api.get("/admin/routing", **{"from": frm, "to": to})
    sav = int(page.attr("#savings", "data-savings-micros"))
    check(sav == routing["savings_micros"], f"savings {sav} != API savings_micros {routing['savings_micros']}")
    passed(f"b4 routing savings match the API: {sav} micros")

    models = api.get("/admin/usage", **{"from": frm, "to": to, "group_by": "model"})["data"]
    top = sorted((r["cost_micros"] for r in models), reverse=True)[:10]
    cells = [int(c.get_attribute("data-cost-micros")) for c in driver.find_elements(by, "#top-models tbody [data-cost-micros]")]
    check(cells == top, f"top-models costs {cells} != API top 10 {top}")
    keys = api.get("/admin/usage", **{"from": frm, "to": to, "group_by": "key"})["data"]
    topk = sorted((r["cost_micros"] for r in keys), reverse=True)[:10]
    cells = [int(c.get_attribute("data-cost-micros")) for c in driver.find_elements(by, "#top-keys tbody [data-cost-micros]")]
    check(cells == topk, f"top-keys costs {cells} != API top 10 {topk}")
    passed("b5 top keys and top models tables match the API")

    # ---- (e) screenshot of the whole dashboard, all tenants
    full_page_screenshot(driver, args.screenshot)
    passed(f"e1 full-page screenshot saved to {args.screenshot}")

    # ---- (c) tenant filter and stack-by
    series_all = {r[1] for r in rects}
    per_tenant = api.get("/admin/usage", **{"from": frm, "to": to, "group_by": "tenant"})["data"]
    spenders = sorted((r for r in per_tenant if r["tenant"] and r["cost_micros"] > 0), key=lambda r: -r["cost_micros"])
    options = [o.get_attribute("value") for o in driver.find_elements(by, "#tenant option")]
    check(options[0] == "" and len(options) > 1, f"tenant select options look wrong: {options}")
    tenant = spenders[0]["tenant"] if spenders else options[1]
    Select(driver.find_element(By.ID, "tenant")).select_by_value(tenant)
    page.wait_ready(frm, to, tenant, "tenant")
    t_usage = api.get("/admin/usage", **{"from": frm, "to": to, "tenant": tenant, "group_by": "day,model"})
    t_total = t_usage["totals"]["cost_micros"]
    rects = page.rects()
    series = {r[1] for r in rects}
    check(series <= {tenant}, f"with tenant={tenant} the chart shows series {sorted(series)}")
    check(sum(r[2] for r in rects) == t_total, f"chart for {tenant} sums to {sum(r[2] for r in rects)}, API says {t_total}")
    check(int(page.attr("#total-spend", "data-cost-micros")) == t_total, f"total-spend for {tenant} != API {t_total}")
    if len(series_all) > 1:
        check(series != series_all, "tenant filter did not change the chart series")
    check(all(t == tenant for t, *_ in page.budgets()), f"budgets of other tenants shown with tenant={tenant}")
    t_routing = api.get("/admin/routing", **{"from": frm, "to": to, "tenant": tenant})
    check(int(page.attr("#savings", "data-savings-micros")) == t_routing["savings_micros"], f"savings for {tenant} != API")
    passed(f"c1 tenant filter {tenant!r}: chart series {sorted(series)}, total {t_total} micros equal the API")

    driver.find_element(By.ID, "stack-model").click()
    page.wait_ready(frm, to, tenant, "model")
    rects = page.rects()
    want = sorted((r["day"], label(r["model"]), r["cost_micros"]) for r in t_usage["data"])
    check(sorted(map(tuple, rects)) == want, "stacked-by-model segments differ from API rows (day, model, cost)")
    m_series = {r[1] for r in rects}
    check(m_series == {label(r["model"]) for r in t_usage["data"]}, f"model series {sorted(m_series)} wrong")
    check(not rects or m_series != series, "stack-by model did not change the series")
    passed(f"c2 stack by model: series {sorted(m_series)} equal the API models")

    # ---- (d) downloads equal the API's export for the same filters
    for button, fmt, name in (("download-csv", None, f"tollgate-chargeback-{frm}-{to}.csv"),
                              ("download-focus", "focus", f"tollgate-focus-{frm}-{to}.csv")):
        for p in Path(download_dir).iterdir():
            p.unlink()
        want = api.get_bytes("/admin/export/chargeback", **{"from": frm, "to": to, "tenant": tenant, "format": fmt})
        driver.find_element(By.ID, button).click()
        got = wait_download(download_dir, name, args.timeout)
        check(got == want, f"{name}: downloaded {len(got)} bytes differ from the API's {len(want)} bytes")
        passed(f"d{1 if fmt is None else 2} {button} saved {name}, byte-identical to the API ({len(got)} bytes)")

    # ---- end: logout, nothing fetched from elsewhere, no script errors
    driver.find_element(By.ID, "logout").click()
    page.wait(lambda: driver.find_element(By.ID, "login").is_displayed(), "the login form after logout")
    check(page.js("return sessionStorage.length") == 0, "token still in sessionStorage after logout")
    passed("f1 logout shows the login form and forgets the token")

    outside = [n for n in page.resources_outside(origin) if not n.startswith(f"blob:{origin}/")]
    check(not outside, f"page requested resources outside {origin}: {outside}")
    try:
        logs = driver.get_log("browser")
    except WebDriverException:
        logs = []
    # The wrong-token login is expected to log one failed 401 request.
    severe = [e["message"] for e in logs if e.get("level") == "SEVERE" and "401" not in e["message"]]
    check(not severe, f"browser console errors: {severe}")
    passed("f2 no outside requests and no console errors")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="admin server base URL, e.g. http://127.0.0.1:9091")
    ap.add_argument("--token", required=True, help="admin token")
    ap.add_argument("--from", dest="date_from", required=True, help="YYYY-MM-DD")
    ap.add_argument("--to", dest="date_to", required=True, help="YYYY-MM-DD")
    ap.add_argument("--screenshot", required=True, help="where to save the full-page PNG")
    ap.add_argument("--timeout", type=float, default=30, help="seconds to wait for each page state")
    args = ap.parse_args()

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            print(f"ERROR {binary} not found (apt-get install chromium chromium-driver)", file=sys.stderr)
            return 2
    # Fail early, and clearly, when the server is down or the token is wrong.
    try:
        Api(args.url, args.token).get("/admin/tenants")
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        print(f"ERROR cannot reach the admin server at {args.url}: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"ERROR the admin API refused the setup call: {e}", file=sys.stderr)
        return 2
    download_dir = tempfile.mkdtemp(prefix="tollgate-dash-")
    try:
        driver = make_driver(download_dir)
    except WebDriverException as e:
        print(f"ERROR could not start chromium: {e.msg}", file=sys.stderr)
        return 2
    try:
        run(args, driver, download_dir)
        print("all dashboard checks passed")
        return 0
    except (CheckFailed, WebDriverException) as e:
        if isinstance(e, WebDriverException):
            e = f"browser error: {e.msg}"
        shot = Path(download_dir).with_suffix(".failure.png")
        try:
            full_page_screenshot(driver, shot)
            hint = f" (page screenshot: {shot})"
        except Exception:  # the failure is what matters; the screenshot is a bonus
            hint = ""
        print(f"FAIL {e}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError) as e:
        print(f"FAIL lost the admin server at {args.url}: {e}", file=sys.stderr)
        return 1
    finally:
        driver.quit()
        shutil.rmtree(download_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
