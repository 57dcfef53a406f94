"""The audit reports as a reader sees them: real HTML reports of real stage runs, opened in a
real headless Chromium (Debian's `chromium`, driven by playwright through its executable path).

``check_report`` is also used by the end-to-end test on all four stage reports of a full run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from fraudlib import runner

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TEST_NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
VIEWPORT = {"width": 1280, "height": 800}
NOISE = ("LibraryNoise", "Warning:", "WARNING", "%|", "it/s]", "INFO mlflow")


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium on PATH: the reports are tested in a real browser "
                    "(Debian: apt-get install chromium; or set CHROMIUM=/path/to/chrome)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, html: Path):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(html.resolve().as_uri())
    page.wait_for_load_state("load")
    return page


def in_first_viewport(page, text: str) -> bool:
    box = page.get_by_text(text, exact=False).first.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"]


def check_report(page, summary_rows: tuple[str, ...] = ("run", "git commit", "data manifest", "outcome"),
                 min_images: int = 0) -> dict:
    """Asserts what a reader must see in a stage's HTML report; returns facts for more checks."""
    heading = page.locator("h3", has_text="summary").first
    assert in_first_viewport(page, heading.inner_text()), "the summary heading is below the first screen"
    summary = heading.locator("xpath=following::table[1]")
    cells = summary.locator("td").all_inner_texts()
    for row in summary_rows:
        assert row in cells, f"summary row {row!r} missing: {cells}"
        assert in_first_viewport(page, row), f"summary row {row!r} is below the first screen"
    code = page.evaluate("document.querySelectorAll('.jp-CodeCell .jp-InputArea, .jp-CodeMirrorEditor, .input_area').length")
    assert code == 0, f"{code} code cells are shown"
    text = page.inner_text("body")
    assert "report.start()" not in text and "from fraudlib" not in text
    stderr = page.evaluate("document.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.stderr\"]').length")
    assert stderr == 0, "stderr output (warnings, log lines, progress bars) is shown"
    assert not [n for n in NOISE if n in text], [n for n in NOISE if n in text]
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= min_images and all(done and width > 0 for done, width in images), images
    cells = page.evaluate("Array.from(document.querySelectorAll('td, th')).map(c => c.innerText.trim())")
    assert "..." not in cells and "…" not in cells, "a table is truncated"
    assert " rows × " not in text, "a table is truncated"
    hrefs = page.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
    notebook = [h for h in hrefs if h.endswith(".ipynb")]
    assert notebook, "no link to the notebook that keeps the code"
    return {"text": text, "images": len(images), "notebook": notebook[0]}


def test_stage_report_reads_first_summary_then_content_no_code_images_load(tmp_path, monkeypatch, browser):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    result = runner.run_pipeline(NOTEBOOKS, tmp_path / "runs", stages="preprocess", run_id="r",
                                 assignments={"synthetic_rows": "20000"}, progress=False)
    assert result.status == runner.SUCCEEDED, result.record
    run_dir = tmp_path / "runs" / "r"
    page = open_page(browser, run_dir / "01_preprocess.html")
    facts = check_report(page, min_images=2)
    manifest = result.record["stages"][0]["outputs"]["manifest_hash"]
    assert manifest[:16] in facts["text"] and "embedded default data" in facts["text"]
    # The executed notebook opens with the same summary, as a markdown output of its first cell.
    first = nbformat.read(run_dir / "01_preprocess.ipynb", as_version=4).cells[0]
    assert manifest[:16] in first.outputs[0]["data"]["text/markdown"]
    # Every split row of the table is there (3 splits), whole.
    assert all(split in facts["text"] for split in ("train", "validation", "test"))
    assert (run_dir / facts["notebook"]).is_file()

    index = open_page(browser, run_dir / "index.html")
    link = index.locator("a", has_text="report").first
    assert link.get_attribute("href") == "01_preprocess.html"
    link.click()
    index.wait_for_load_state("load")
    assert index.url.endswith("01_preprocess.html")


def test_library_warnings_and_progress_bars_stay_in_the_notebook_not_in_the_report(tmp_path, monkeypatch, browser):
    monkeypatch.setenv("FRAUD_RUNS_DIR", str(tmp_path / "runs"))
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(TEST_NOTEBOOKS / "noisy.ipynb", notebooks / "01_noisy.ipynb")
    result = runner.run_pipeline(notebooks, tmp_path / "runs", run_id="n", progress=False)
    assert result.status == runner.SUCCEEDED
    kept = nbformat.read(tmp_path / "runs" / "n" / "01_noisy.ipynb", as_version=4)
    assert "LibraryNoise" in str(kept.cells)  # the notebook keeps everything
    page = open_page(browser, tmp_path / "runs" / "n" / "01_noisy.html")
    text = page.inner_text("body")
    assert "the result the reader needs" in text
    assert "LibraryNoise" not in text and "%|" not in text
    assert page.evaluate("document.querySelectorAll('.jp-CodeCell .jp-InputArea').length") == 0
