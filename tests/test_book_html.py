"""The built book in a real browser: equations render, figures load, Colab links are right.

Runs against ``_build/html`` (built by ``jupyter-book build .``) in headless Chromium (Debian's
``chromium``, driven by Playwright). Skipped, with the reason, when either is missing. Saves a
screenshot of each chapter to ``_build/screenshots/``.
"""

from __future__ import annotations

import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return files


def notebook_chapters() -> list[str]:
    return [f for f in chapters() if (ROOT / f"{f}.ipynb").exists()]


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.skip("the book is not built: run `jupyter-book build . -W -n --keep-going` first")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`)")
    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = partial(QuietHandler, directory=str(HTML))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield browser
        browser.close()


@pytest.mark.parametrize("chapter", chapters())
def test_chapter_renders(browser, server: str, chapter: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []

    def route(request_route, request) -> None:  # the book must work offline: no CDN
        if request.url.startswith(server):
            request_route.continue_()
        else:
            external.append(request.url)
            request_route.abort()

    page.route("**/*", route)
    page.goto(f"{server}/{chapter}.html", wait_until="load")
    if page.locator("script[src*='mathjax']").count():  # Sphinx loads MathJax only where there is math
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
        page.evaluate("() => MathJax.startup.promise")

    math_nodes = page.locator(".math").count()
    rendered = page.locator("mjx-container").count()
    mathjax_errors = page.locator("mjx-merror").count()
    assert mathjax_errors == 0, f"{chapter}: {mathjax_errors} equations failed to render"
    if math_nodes:
        assert rendered >= math_nodes, f"{chapter}: {rendered} of {math_nodes} equations rendered"

    broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert broken == [], f"{chapter}: images that did not load: {broken}"

    if chapter in notebook_chapters():
        links = page.evaluate("() => [...document.querySelectorAll('a')].map(a => a.href).filter(h => h.includes('colab.research.google.com'))")
        expected = f"https://colab.research.google.com/github/pay-better-attention/pba/blob/main/{chapter}.ipynb"
        assert expected in links, f"{chapter}: Colab links {links}"

    searches = page.evaluate(
        "() => [...document.querySelectorAll('.search-button-field, .search-button')]"
        ".filter(e => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden').length"
    )
    assert searches == 1, f"{chapter}: {searches} search boxes visible at 1280 px"
    title = page.locator(".bd-sidebar-primary .navbar-brand").first
    if title.count():
        page.evaluate("() => document.querySelectorAll('.bd-sidebar-primary, .bd-sidebar-primary *').forEach(e => { e.scrollTop = 0 })")
        box = title.bounding_box()
        covering = page.evaluate(
            "([x, y]) => { const e = document.elementFromPoint(x, y); return e ? e.closest('.bd-sidebar-primary') !== null : false }",
            [box["x"] + box["width"] / 2, box["y"] + 2],
        )
        assert covering, f"{chapter}: the top of the site title in the sidebar is covered"

    local_errors = [e for e in errors if "net::ERR_FAILED" not in e]
    assert local_errors == [], f"{chapter}: console errors {local_errors}"
    assert not [u for u in external if "mathjax" in u.lower()], f"{chapter}: MathJax from a CDN: {external}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{chapter.replace('/', '_')}.png"), full_page=False)
    page.close()
