"""Opening a report from disk in headless Chromium and reading back what loaded (shared by the report tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

BROWSER = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
"""Debian's chromium (make install installs it), or None."""

NO_BROWSER = "no chromium or chromium-browser on PATH (make install installs it)"

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const svg = document.querySelector("svg");
  const lines = [...document.querySelectorAll("svg path")];
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.svgWidth = svg ? svg.getBoundingClientRect().width : 0;
  document.body.dataset.lineWidths = lines.map((line) => line.getBBox().width).join(" ");
});
</script>
"""


def open_in_chromium(report: Path, scratch: Path) -> dict[str, str]:
    """Load a copy of ``report`` from file:// with a probe script; what the probe found once the page loaded.

    Returns:
        ``{"images", "loaded", "svg-width", "line-widths"}`` as text (line widths space-separated).
    """
    page = scratch / f"probed-{report.name}"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    # A private profile and HOME: chromium writes both; --no-sandbox because tests may run as root.
    result = subprocess.run(
        [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={scratch / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, env={"HOME": str(scratch), "PATH": "/usr/bin:/bin"})
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, f"chromium dumped no DOM (rc {result.returncode}): {result.stderr[-2000:]}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
