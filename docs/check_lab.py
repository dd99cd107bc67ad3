"""Check `make lab` as a learner sees it: JupyterLab in a real (headless) browser opens lesson 00 and renders its
explorer.

    apt-get install -y chromium chromium-driver        # Debian's browser and its driver (once)
    .venv/bin/pip install -e '.[dev,browser]'          # selenium
    .venv/bin/python docs/check_lab.py                 # -> docs/lesson00_explorer.png

Starts JupyterLab with `make lab`'s flags (offline; the whole repository served, lesson 00 the default page) on
127.0.0.1 with a random token, serving a temporary copy of the repository's notebooks/, exercises/ and solutions/
(so nothing in them is ever autosaved), and in headless Chromium:

1. opens the server's root URL, as the printed one is opened: it must land on lesson 00;
2. lesson 00 must open unmodified (JupyterLab rewrites nothing once its kernel runs), and so must exercise 00;
3. the explorer cell, not yet run, shows its saved widget or the one-line "run this cell" note (no
   ``VBox(children=...)``), and its summary table renders as a table;
4. runs the explorer cell the way a learner does (click it, Shift+Enter), waits for the widget (dropdowns, slider,
   the per-layer counts and bar chart), picks LoRA in the method dropdown, and saves a screenshot.

Exits non-zero, saying what was missing. Headless Chromium never has the window focus that JupyterLab's "current
notebook" follows, so the page is told it has (DevTools' focus emulation). The kernel-side part runs in CI:
tests/test_lab.py.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESSON = "notebooks/00_setup_and_baselines.ipynb"
EXERCISE = "exercises/00_counting_costs.ipynb"
FOLDERS = ("notebooks", "exercises", "solutions")  # what the learner opens (make lab serves the whole repository)
# what `make lab` passes too (checked against the Makefile below): the repository's root served, lesson 00 opened
# (also the URL printed with --no-browser), lab/overrides.json (never ask to fetch news; save widget state), no
# news, update or extension-index checks (offline); --allow-root only where one runs as root (containers)
LAB_FLAGS = [f"--LabApp.default_url=/lab/tree/{LESSON}", f"--LabApp.app_settings_dir={ROOT / 'lab'}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else [])


def _check_makefile_flags() -> None:
    """`make lab` runs with the flags this script checks (root_dir is the served folder: here a copy)."""
    text = (ROOT / "Makefile").read_text().replace("$(CURDIR)", str(ROOT)).replace("\\\n", " ")
    lesson = re.search(r"^LESSON00 := (.+)$", text, re.M)
    text = text.replace("$(LESSON00)", lesson.group(1).strip() if lesson else "?")
    missing = [f for f in LAB_FLAGS if f != "--allow-root" and f not in text]
    if missing or f"--ServerApp.root_dir={ROOT}" not in text:
        raise SystemExit(f"the Makefile's lab target lacks {missing or ['--ServerApp.root_dir=$(CURDIR)']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(workdir: Path, port: int, token: str, log) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(workdir / ".jupyter"),
               JUPYTER_RUNTIME_DIR=str(workdir / ".runtime"))
    env.pop("MINIPEFT_STATIC", None)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={workdir}", "--LabApp.expose_app_in_browser=True", *LAB_FLAGS]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"jupyter lab exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"jupyter lab did not answer on 127.0.0.1:{port} within 120 s; see {log.name}")


def _browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                 "--disable-backgrounding-occluded-windows", f"--window-size={width},{height}", "--hide-scrollbars"]:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    # JupyterLab's current notebook follows the focus, which a headless window never gets: pretend it has it
    browser.execute_cdp_cmd("Emulation.setFocusEmulationEnabled", {"enabled": True})
    return browser


def _wait(driver, what: str, script: str, timeout: float, *args):
    """Poll a JavaScript expression until it is truthy; fail naming what did not appear."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _settled_screenshot(driver, timeout: float, index: int) -> bytes:
    """A screenshot once the chart has painted and the page is still. Headless Chromium rasterises a large image
    in tiles, slowly when it runs at low priority beside other work: wait until the chart's box on the screenshot
    holds its dark bars and axes, and two screenshots five seconds apart agree."""
    import io

    from PIL import Image

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        time.sleep(5.0)
        png = driver.get_screenshot_as_png()
        box = driver.execute_script(CHART_BOX, index)
        shot = Image.open(io.BytesIO(png)).convert("L")
        chart = shot.crop(tuple(int(v * box[4]) for v in box[:4]))
        if chart.getextrema()[0] < 100 and png == last:
            return png
        last = png
    raise SystemExit(f"the chart had not painted after {timeout:.0f} s")


# JavaScript run in the page. `window.jupyterapp` is JupyterLab itself (expose_app_in_browser).
NOTEBOOK_READY = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
return !!(w && w.content && w.content.widgets && w.content.widgets.length > 0 && w.sessionContext
          && w.sessionContext.session && w.sessionContext.session.kernel
          && w.sessionContext.session.kernel.status === 'idle');
"""
OPENED = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
return w && w.context ? w.context.path : null;
"""
OPENED_IDLE = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
return !!(w && w.context && w.context.path === arguments[0] && w.sessionContext && w.sessionContext.session
          && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle');
"""
DIRTY = "return window.jupyterapp.shell.currentWidget.model.dirty;"
OPEN = "window.jupyterapp.commands.execute('docmanager:open', {path: arguments[0]});"
EXPLORER_BEFORE_RUN = """
const nb = window.jupyterapp.shell.currentWidget.content;
const cell = nb.widgets[arguments[0]].node;
return {table: cell.querySelectorAll('.jp-RenderedMarkdown table').length,
        widget: cell.querySelectorAll('.jp-OutputArea-output .widget-dropdown select').length,
        text: (cell.querySelector('.jp-OutputArea') || {}).innerText || ''};
"""
FIND_AND_SHOW_CELL = """
const nb = window.jupyterapp.shell.currentWidget.content;
const i = nb.widgets.findIndex(c => c.model.type === 'code'
    && c.model.sharedModel.getSource().includes('minipeft.course.widgets') && c.model.sharedModel.getSource().includes('explore('));
if (i < 0) return -1;
nb.activeCellIndex = i;
nb.mode = 'command';
await nb.scrollToItem(i, 'start');
return i;
"""
CELL_NODE = "return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node;"
WIDGET_RENDERED = """
const cell = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node;
const q = s => cell.querySelectorAll(s).length;
const text = (cell.querySelector('.widget-output') || {}).innerText || '';
return q('.jp-OutputArea-output .widget-dropdown select') >= 2 && q('.widget-slider, .widget-hslider') >= 1
       && text.includes(arguments[1])
       && [...cell.querySelectorAll('.widget-output img')].some(i => i.complete && i.naturalWidth > 0);
"""
CHART_BOX = """
const cell = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node;
const r = [...cell.querySelectorAll('.widget-output img')].pop().getBoundingClientRect();
return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];
"""
SHOW_CELL = """
window.jupyterapp.shell.collapseLeft();   // the file browser off: the whole width for the lesson
window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node.scrollIntoView({block: 'start'});
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "lesson00_explorer.png")
    ap.add_argument("--timeout", type=float, default=240, help="seconds for each wait (kernel, widget)")
    ap.add_argument("--size", default="1280x1600", help="browser window, WxH (the table, the widget and its chart)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose notebooks are served (a copy)")
    args = ap.parse_args()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _check_makefile_flags()
    workdir = Path(tempfile.mkdtemp(prefix="minipeft-lab-"))
    for folder in FOLDERS:
        shutil.copytree(args.root / folder, workdir / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = _free_port(), secrets.token_hex(16)
    log = open(workdir / "jupyter.log", "w")
    lab = _start_lab(workdir, port, token, log)
    width, height = (int(v) for v in args.size.split("x"))
    driver = None
    try:
        log.flush()
        printed = f"/lab/tree/{LESSON}?token="  # what --no-browser prints to open (a token given is shown as ...)
        if printed not in (workdir / "jupyter.log").read_text():
            raise SystemExit(f"jupyter lab --no-browser did not print lesson 00's URL (…{printed[:40]}…)")
        driver = _browser(width, height)
        t0 = time.time()
        driver.get(f"http://127.0.0.1:{port}/?token={token}")  # the server's root, as the printed URL is opened
        _wait(driver, "JupyterLab to open a notebook with an idle kernel", NOTEBOOK_READY, args.timeout)
        if driver.execute_script(OPENED) != LESSON:
            raise SystemExit(f"the root URL opened {driver.execute_script(OPENED)!r}, not {LESSON}")
        time.sleep(3)  # JupyterLab writes the kernel's metadata into the model once the kernel is up
        if driver.execute_script(DIRTY):
            raise SystemExit(f"{LESSON} is marked modified as soon as it opens: its kernelspec or language_info is "
                             "not what JupyterLab writes (python -m minipeft.course.notebook_runner normalise)")
        index = driver.execute_script(FIND_AND_SHOW_CELL)
        if index < 0:
            raise SystemExit(f"{LESSON}: no cell imports minipeft.course.widgets and calls explore()")
        before = driver.execute_script(EXPLORER_BEFORE_RUN, index)
        if "VBox(" in before["text"] or not (before["widget"] or "Run this cell" in before["text"]):
            raise SystemExit("the explorer, not yet run, shows neither its saved widget nor the 'run this cell' "
                             f"note: {before['text'][-300:]!r}")
        if before["text"] and not before["table"] and "| method |" in before["text"]:
            raise SystemExit("the explorer's summary table shows as raw pipes, not as a table")
        # run it as a learner does: click the cell's prompt area (command mode), then Shift+Enter
        cell = driver.execute_script(CELL_NODE, index)
        prompt = cell.find_element("css selector", ".jp-InputPrompt")
        ActionChains(driver).move_to_element(prompt).click().key_down(Keys.SHIFT).send_keys(Keys.ENTER) \
            .key_up(Keys.SHIFT).perform()
        _wait(driver, "the explorer widget (2 dropdowns, a slider, the per-layer counts and the bar chart)",
              WIDGET_RENDERED, args.timeout, index, "trainable parameters")
        # pick LoRA in the method dropdown, as a learner would; the kernel redraws the counts and the chart
        # (set on the <select> with a change event, as choosing does: a native popup opened by a click stalls
        # headless Chromium's painting)
        method = cell.find_element("css selector", ".jp-OutputArea-output .widget-dropdown select")
        driver.execute_script("arguments[0].value = 'lora'; arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", method)
        _wait(driver, "the redraw after choosing lora", WIDGET_RENDERED, args.timeout, index,
              "lora on MiniLM-L6 (rank r = 8)")
        if not driver.execute_script(EXPLORER_BEFORE_RUN, index)["table"]:
            raise SystemExit("the explorer's summary table shows as raw pipes, not as a table")
        driver.execute_script(SHOW_CELL, index)
        png = _settled_screenshot(driver, args.timeout, index)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(png)
        shown = "its saved widget" if before["widget"] else "the run-this-cell note"
        print(f"lesson 00 opened from the root URL, unmodified, showing {shown} before running; widget rendered "
              f"and redrawn in {time.time() - t0:.0f} s; screenshot: {args.out}")
        driver.execute_script(OPEN, EXERCISE)
        _wait(driver, f"JupyterLab to open {EXERCISE} with an idle kernel", OPENED_IDLE, args.timeout, EXERCISE)
        time.sleep(3)
        if driver.execute_script(DIRTY):
            raise SystemExit(f"{EXERCISE} is marked modified as soon as it opens")
        print(f"{EXERCISE} opens unmodified")
        return 0
    finally:
        if driver is not None:
            driver.quit()
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
