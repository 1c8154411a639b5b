"""report.html in a real browser: headless Chromium (Debian's, installed by `make test` through
tests/ensure-chromium.sh) renders the page from disk, a probe reports every image's decoded size, and a
full-page screenshot must show the verdict box and the figures.

The probe is injected into a copy of the page: the page itself carries no script (test_report_html).
Thresholds: a page is "not blank" when more than 6 % of its pixels are not white and more than 1.2 % are
strongly coloured (the jet / viridis maps and the verdict colours); this page (two ROIs, 1280 px wide)
measures 9.0 % and 2.6 %, the same page with its images removed (text only) 3.5 % and 0.4 %.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from perfusion.cli.app import main

WIDTH = 1280
#: Chromium refuses screenshots taller than this (its texture limit).
MAX_HEIGHT = 16000
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var out = {n: imgs.length, decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
             height: document.documentElement.scrollHeight,
             verdicts: Array.from(document.querySelectorAll('.verdict h3')).map(function (h) { return h.textContent; })};
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed and tests/ensure-chromium.sh could not install it here "
                "(it needs root or password-less sudo and apt-get); run 'sudo apt-get install chromium'")


def _run(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--user-data-dir=" + args.pop(0)]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, phantom_case):
    _chromium()
    base = tmp_path_factory.mktemp("browser")
    out = base / "out"
    assert main(["analyze", str(phantom_case["dsc"]), "--out", str(out), "--roi", str(phantom_case["lesion_hyper"]),
                 "--roi", str(phantom_case["lesion_hypo"]), "-q"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    probed = base / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _run([str(base / "profile1"), f"--window-size={WIDTH},1000", "--dump-dom", probed.as_uri()])
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert m, "the probe did not run: " + dom.stdout[:500]
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    height = min(int(probe["height"]) + 20, MAX_HEIGHT)
    shot = base / "page.png"
    res = _run([str(base / "profile2"), f"--window-size={WIDTH},{height}", f"--screenshot={shot}",
                (out / "report.html").as_uri()])
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    return {"out": out, "page": page, "probe": probe, "shot": shot, "height": height}


def test_every_figure_is_decoded_by_the_browser(rendered):
    n_tags = len(re.findall(r"<img ", rendered["page"]))
    # rCBV overlay, CBV/CBF/MTT/Tmax/K2 montages, AIF, and per ROI curves + histogram (2 ROIs)
    assert n_tags >= 1 + 5 + 1 + 2 * 2
    assert rendered["probe"]["n"] == n_tags
    assert rendered["probe"]["decoded"] == n_tags


def test_verdicts_are_rendered(rendered):
    rep = json.loads((rendered["out"] / "report.json").read_text())
    shown = " ".join(rendered["probe"]["verdicts"])
    assert "roi-lesion_hyper: Likely recurrence" in shown
    assert "roi-lesion_hypo: Likely treatment effect" in shown
    assert len(rendered["probe"]["verdicts"]) == len(rep["rois"])


def test_screenshot_is_not_blank(rendered):
    from PIL import Image

    img = np.asarray(Image.open(rendered["shot"]).convert("RGB"), dtype=np.int16)
    assert img.shape[1] == WIDTH and img.shape[0] == rendered["height"]
    not_white = (img.min(axis=2) < 235).mean()
    coloured = ((img.max(axis=2) - img.min(axis=2)) > 80).mean()
    print(f"screenshot {img.shape[1]} x {img.shape[0]} px: {100 * not_white:.1f} % not white, "
          f"{100 * coloured:.1f} % strongly coloured")
    assert not_white > 0.06 and coloured > 0.012
    # the top of the page (what a reader sees first) holds the red disclaimer frame and a verdict colour
    top = img[:900]
    red = (top[..., 0] > 150) & (top[..., 1] < 60) & (top[..., 2] < 60)
    assert red.sum() > 500
