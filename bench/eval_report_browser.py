"""Open a `gad report` HTML file in headless Chromium and check that every embedded image loads.

Usage: python bench/eval_report_browser.py RUN_DIR/report/report.html [--screenshot out.png]

Prints one JSON line ``{"images": N, "loaded": K, "browser": ...}`` and exits 0 only when
N > 0 and K == N. The report itself has no scripts; a copy with a small checker script appended is
what the browser opens (the checker reads ``img.complete`` and ``naturalWidth`` after ``load``).
Needs Debian's ``chromium`` (``apt-get install chromium``); exits 77 when no browser is found.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKER = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var sizes = ok.map(function (i) { return i.naturalWidth + 'x' + i.naturalHeight; }).join(',');
  var d = document.createElement('pre');
  d.id = 'gad-image-check';
  d.textContent = 'GAD_IMAGES ' + ok.length + '/' + imgs.length + ' ' + sizes;
  document.body.appendChild(d);
});
</script>"""


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check(html_path: Path, screenshot: Path | None = None, timeout: float = 120.0) -> dict:
    browser = find_browser()
    if browser is None:
        return {"error": "no chromium found"}
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        text = html_path.read_text(encoding="utf-8")
        page.write_text(text.replace("</body>", CHECKER + "</body>") if "</body>" in text else text + CHECKER, encoding="utf-8")
        # --no-sandbox: containers run as root; a fresh profile dir keeps runs independent.
        base = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000"]
        out = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=timeout)
        m = re.search(r"GAD_IMAGES (\d+)/(\d+) ?([0-9x,]*)", out.stdout)
        result = {"browser": browser, "images": int(m.group(2)) if m else None, "loaded": int(m.group(1)) if m else None,
                  "sizes": m.group(3).split(",") if m and m.group(3) else []}
        if m is None:
            result["error"] = "checker output not found; browser stderr: " + out.stderr[-500:]
        if screenshot is not None:
            subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={screenshot.resolve()}", html_path.resolve().as_uri()],
                           capture_output=True, text=True, timeout=timeout)
            result["screenshot"] = str(screenshot) if screenshot.is_file() else None
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshot", type=Path)
    args = ap.parse_args()
    result = check(args.html, args.screenshot)
    print(json.dumps(result))
    if result.get("error") == "no chromium found":
        return 77
    return 0 if result.get("images") and result["loaded"] == result["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
