#!/usr/bin/env python3
"""Take the two MLflow UI screenshots used in the README (issue 17).

Starts `mlflow ui` on a *copy* of a study's tracking store (so the UI can
never write to the study), drives headless Chromium through the same clicks
a reader would make, saves two PNGs and stops the server:

  mlflow-runs-grouped-by-condition.png  runs table, Group by -> condition,
                                        with a few metric columns
  mlflow-chart-view.png                 Chart view with the same grouping:
                                        a bar chart comparing conditions and
                                        the per-step line chart of one metric

Needs Playwright for Python (`pip install playwright`; no browser download:
the system Chromium is used) and an `mlflow` executable (valind's venv).

    python docs/mlflow_screenshots.py --db studies/demo-protocol/mlflow.db \
        --port 5077 --out-dir docs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1400, "height": 900}


# --------------------------------------------------------------- the store --
def study_facts(db: Path) -> dict:
    """Experiment id, metric keys and the study's values, read from sqlite."""
    con = sqlite3.connect(db)
    exp_ids = [r[0] for r in con.execute(
        "SELECT DISTINCT r.experiment_id FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'valind.kind' AND t.value = 'study' AND r.lifecycle_stage = 'active'")]
    if len(exp_ids) != 1:
        raise SystemExit(f"expected one experiment with a valind study run, found {exp_ids}")
    exp_id = exp_ids[0]
    keys = {r[0] for r in con.execute(
        "SELECT DISTINCT m.key FROM latest_metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
        "WHERE r.experiment_id = ?", (exp_id,))}
    values = sorted({r[0] for r in con.execute(
        "SELECT DISTINCT p.value FROM params p JOIN runs r ON r.run_uuid = p.run_uuid "
        "WHERE r.experiment_id = ? AND p.key = 'value' AND p.value != ''", (exp_id,))})
    con.close()
    return {"experiment_id": exp_id, "metric_keys": keys, "values": values}


def pick_metrics(keys: set[str], values: list[str]) -> tuple[list[str], str]:
    """Table columns and the metric to chart; prefer the newer verdict/ metrics."""
    verdicts = sorted(k for k in keys if re.fullmatch(r"verdict/safety/refusal.*/effect", k))
    columns = verdicts[:1] + [k for k in ["safety/refusal/strmatch"] if k in keys]
    for v in values:  # one "expresses <value>" column per trained value
        columns += sorted(k for k in keys if k.startswith(f"values/expresses/{v}/"))[:1]
    chart_metric = "safety/refusal/strmatch" if "safety/refusal/strmatch" in keys else columns[0]
    return columns[:5], chart_metric


# ------------------------------------------------------------------ server --
def start_ui(mlflow: str, db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        raise SystemExit(f"port {port} already serves something; pick another --port")
    except OSError:
        pass
    proc = subprocess.Popen(
        [mlflow, "ui", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(artifacts)],
        cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: stop_ui ends the workers too
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow ui exited with {proc.returncode}")
            time.sleep(1)
    stop_ui(proc)
    raise SystemExit("mlflow ui did not come up within 120 s")


def stop_ui(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


# ----------------------------------------------------------------- clicks --
def close_assistant(page: Page) -> None:
    """MLflow 3 opens an 'MLflow Assistant' side panel on first visit."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def set_columns(page: Page, show: list[str], hide: list[str]) -> None:
    """Columns -> tick/untick entries, using the dialog's search box."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    tree = page.get_by_test_id("column-selector-tree")
    for name, want in [(n, False) for n in hide] + [(n, True) for n in show]:
        search.fill(name)
        node = tree.locator(".du-bois-light-tree-treenode").filter(
            has=page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$")))
        collapsed = tree.locator(".du-bois-light-tree-switcher_close")
        for _ in range(50):  # the tree sometimes re-collapses its groups while filtering
            if node.count():
                break
            if collapsed.count():
                collapsed.first.click()
            page.wait_for_timeout(200)
        checked = "checked" in (node.locator(".du-bois-light-tree-checkbox").get_attribute("class") or "")
        if checked != want:
            node.locator(".du-bois-light-tree-checkbox").click()
    search.fill("")
    page.keyboard.press("Escape")


def group_by(page: Page, param: str) -> None:
    """Group by -> <param> (tags are listed first, then params)."""
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menu").get_by_text(param, exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name=f"Group by: {param}").wait_for()


def drag(page: Page, x: float, y: float, dx: float, dy: float) -> None:
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y + dy / 2)
    page.mouse.move(x + dx, y + dy)
    page.mouse.up()


def widen_column(page: Page, header_text: str, by: int) -> None:
    """Drag a runs-table column's right edge."""
    header = page.locator(".ag-header-cell", has_text=header_text).first
    box = header.bounding_box()
    drag(page, box["x"] + box["width"] - 2, box["y"] + box["height"] / 2, by, 0)


def widen_runs_panel(page: Page, by: int) -> None:
    """Chart view: drag the splitter right of the runs list."""
    box = page.locator("div.is-table-comparing-runs-mode:not(.ag-theme-balham)").bounding_box()
    drag(page, box["x"] + box["width"] - 4, box["y"] + box["height"] / 2, by, 0)


def resize_chart_cards(page: Page, dx: int, dy: int) -> None:
    """Drag the first chart card's corner handle (the section's grid follows it)."""
    box = page.get_by_test_id("draggable-card-resize-handle").first.bounding_box()
    drag(page, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, dx, dy)


def add_bar_chart(page: Page, section: str, metric: str) -> None:
    """Chart view: the section's 'Add chart' -> Bar chart -> Metric -> Add chart."""
    header = page.get_by_test_id("experiment-view-compare-runs-section-header").filter(
        has=page.get_by_text(section, exact=True))
    header.scroll_into_view_if_needed()
    page.locator(".du-bois-light-collapse-item").filter(has=header).get_by_role(
        "button", name="Add chart").click()
    page.get_by_role("menuitem", name="Bar chart").click()
    dialog = page.get_by_role("dialog")
    dialog.locator("[role=combobox]").last.click()  # the Metric field
    page.keyboard.type(metric)
    page.keyboard.press("Enter")
    # drop the metric the dialog preselects (the experiment's first one)
    others = dialog.locator(".du-bois-light-select-selection-item").filter(
        has_not=page.get_by_text(metric, exact=True))
    while others.count():
        others.first.locator(".du-bois-light-select-selection-item-remove").click()
    dialog.get_by_role("button", name="Add chart").click()
    dialog.wait_for(state="hidden")


# -------------------------------------------------------------------- main --
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, default=REPO / "studies/demo-protocol/mlflow.db",
                    help="the study's mlflow.db (only read; the UI runs on a copy)")
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs")
    ap.add_argument("--mlflow", default=shutil.which("mlflow") or str(REPO / ".venv/bin/mlflow"),
                    help="mlflow executable (default: on PATH, else valind's .venv)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()

    db = args.db.resolve()
    artifacts = db.parent / "mlartifacts"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tables_png = args.out_dir / "mlflow-runs-grouped-by-condition.png"
    charts_png = args.out_dir / "mlflow-chart-view.png"

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlflow.db"
        shutil.copyfile(db, copy)
        facts = study_facts(copy)
        columns, chart_metric = pick_metrics(facts["metric_keys"], facts["values"])
        url = (f"http://127.0.0.1:{args.port}/#/experiments/{facts['experiment_id']}"
               f"/runs?workflowType=machine_learning")
        print(f"runs table: {url}\ncolumns: {columns}\nchart metric: {chart_metric}")

        server = start_ui(args.mlflow, copy, artifacts, args.port)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.get_by_role("button", name="Group by").wait_for(timeout=60_000)
                close_assistant(page)

                # 1. runs table grouped by condition, with metric columns
                set_columns(page, show=columns, hide=["Dataset", "Source", "Models"])
                group_by(page, "condition")
                widen_column(page, "Run Name", 50)
                for name in columns:
                    widen_column(page, name, 60)
                page.wait_for_timeout(1500)
                page.screenshot(path=tables_png)

                # 2. chart view, same grouping: bar chart + line chart vs step
                page.locator("label", has=page.locator(
                    "input[name=runs-view-mode][value=CHART]")).click()
                page.get_by_placeholder("Search metric charts").wait_for()
                widen_runs_panel(page, 60)
                section = chart_metric.rsplit("/", 1)[0]
                add_bar_chart(page, section, chart_metric)
                page.get_by_placeholder("Search metric charts").fill(chart_metric)
                page.wait_for_timeout(1500)
                resize_chart_cards(page, 150, 180)  # two wider cards per row
                page.mouse.move(5, 5)  # no hover tooltips in the shot
                page.wait_for_timeout(1500)
                page.screenshot(path=charts_png)
                browser.close()
        finally:
            stop_ui(server)
    for png in (tables_png, charts_png):
        print(f"wrote {png} ({png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
