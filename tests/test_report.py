"""`alignkit report RUN_DIR`: a self-contained report.html, checked in headless Chromium for images, video, audio
and text (real tiny runs of each modality), unfinished runs and bad input."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import train_captured
from PIL import Image

from alignkit.cli import main
from alignkit.html_page import page
from alignkit.report import render_sample

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SMALL = ["train.epochs=1", "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4",
         "train.train_batch_size=4", "backbone.num_steps=3", "eval.before_after=true", "eval.num_prompts=2"]

# injected at the top of a copy of the page: records console errors and failed loads, then after load writes what
# loaded into <pre id="__check"> for --dump-dom
PROBE = """<script>
window.__errors = [];
["error", "warn"].forEach(function (k) { var o = console[k]; console[k] = function () {
  window.__errors.push(k + ": " + Array.from(arguments).join(" ")); o.apply(console, arguments); }; });
window.addEventListener("error", function (e) { var t = e.target || {};
  window.__errors.push("error event: " + (e.message || (t.tagName + " " + String(t.alt || "")))); }, true);
window.addEventListener("load", function () { setTimeout(function () {
  var imgs = Array.from(document.images);
  var media = Array.from(document.querySelectorAll("audio, video"));
  var out = document.createElement("pre"); out.id = "__check";
  out.textContent = JSON.stringify({
    images: imgs.length, bad_images: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
      .map(function (i) { return i.alt; }),
    media: media.length, bad_media: media.filter(function (m) { return m.error || m.readyState < 1; })
      .map(function (m) { return m.error ? "error " + m.error.code : "readyState " + m.readyState; }),
    errors: window.__errors});
  document.body.appendChild(out); }, 300); });
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def browser_check(report: Path, shot: Path) -> dict:
    """What loaded when headless Chromium opened ``report`` (see PROBE); a screenshot is saved to ``shot``."""
    probe = report.with_name("probe_" + report.name)
    probe.write_text(report.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    done = _chromium("--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="__check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not run: {done.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line]
    _chromium("--window-size=1200,2600", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file() and shot.stat().st_size > 5_000
    return result


def _sources(page: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', page)


def _self_contained(page: str) -> None:
    assert all(src.startswith("data:") for src in _sources(page))
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page


def test_report_of_an_image_run(tiny_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_runs["a0"].path
    out = tmp_path / "r.html"
    assert main(["report", str(run), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    _self_contained(page)
    assert "finished: 2 of 2 epochs" in page and "not finished" not in page
    for cells in (["jpeg_compressibility", "1"], ["big", "0.5"], ["aggregate", "-"]):  # the held-out table
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) in page
    assert page.count('alt="rewards against') == 3  # epoch, NFE and model FLOPs (cost/flops_total)
    # 6 held-out samples: 3 most and 3 least changed, each before and after, inlined PNGs named by prompt and seed
    samples = re.findall(r'alt="(eval_(?:before|after)/p\d{5}_s\d\.png)" src="data:image/png;base64,', page)
    assert len(samples) == 12 and len(set(samples)) == 12
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent).stdout.strip()
    if commit:
        assert commit in page  # the environment of the training session
    assert "torch threads" in page and "alignkit train sd3_tiny_flow_grpo" not in page  # argv of pytest, not a CLI
    assert "algo.reward_aggregation=normalize_then_sum" in page  # the overrides


def test_report_of_an_unfinished_run_says_so(tiny_runs, tmp_path: Path) -> None:
    run = tmp_path / "partial"
    shutil.copytree(tiny_runs["a0"].path, run)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n" + rows[2][:40])  # a half-written last row
    for p in (run / "summary.json", run / "eval" / "eval_after.jsonl"):
        p.unlink()
    assert main(["report", str(run), "-q"]) == 0
    page = (run / "report.html").read_text()
    assert '<p class="banner">not finished: 1 of 2 epochs done' in page
    assert "eval_before (epoch 0) and eval_00001 (epoch 1)" in page  # compared with the latest evaluation


@pytest.mark.parametrize("case", ["empty", "missing", "file", "samples"])
def test_report_bad_input_is_one_line(case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "folder"
    args = [str(target)]
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("x")
    elif case == "samples":
        target.mkdir()
        (target / "metrics.jsonl").write_text("")
        args += ["--samples", "0"]
    assert main(["report", *args]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
    expected = {"empty": f"{target} is not an alignkit run folder", "missing": f"{target} does not exist",
                "file": f"{target} is a file", "samples": "--samples 0: must be >= 1"}[case]
    assert expected in errors[0]
    assert not (target / "report.html").exists() if target.is_dir() else True


@pytest.fixture(scope="module")
def modality_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-epoch tiny runs of video (Wan), audio (Stable Audio 3) and text (arithmetic, masked LM)."""
    root = tmp_path_factory.mktemp("modalities")
    recipes = {"video": "wan_tiny_tempflow_grpo", "audio": "stable_audio_tiny_tempflow_grpo",
               "text": "arithmetic_flow_grpo"}
    return {kind: train_captured(root / kind, [recipe, *SMALL]).path for kind, recipe in recipes.items()}


def test_reports_of_video_audio_and_text_runs(modality_runs) -> None:
    for kind, run in modality_runs.items():
        assert main(["report", str(run), "-q"]) == 0
        page = (run / "report.html").read_text()
        _self_contained(page)
        if kind == "video":  # the mp4 clips as animated GIFs
            gifs = re.findall(r'alt="eval_\w+/p\d{5}_s\d\.mp4" src="data:image/gif;base64,', page)
            assert len(gifs) == 4 and all((run / "eval" / f"eval_before/p0000{i}_s0.mp4").is_file() for i in (0, 1))
        elif kind == "audio":  # players and spectrograms
            assert page.count('<audio controls preload="auto" src="data:audio/wav;base64,') == 4
            assert page.count('alt="spectrogram of eval_') == 4
        else:  # the generated text, as text
            rows = [json.loads(line) for line in (run / "eval" / "eval_after.jsonl").read_text().splitlines()]
            assert all(r["file"] is None and r["text"] is not None for r in rows)
            assert all(f"<pre>{html.escape(r['text'])}</pre>" in page for r in rows)


def test_reports_load_in_headless_chromium(tiny_runs, modality_runs, tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium; .ci/run installs it in CI)")
    broken = tmp_path / "broken.html"  # the probe sees failures: a corrupt image and a corrupt wav
    broken.write_text(page("broken", '<img alt="bad" src="data:image/png;base64,AAAA">'
                                     '<audio controls preload="auto" src="data:audio/wav;base64,AAAA"></audio>'))
    seen = browser_check(broken, tmp_path / "broken.png")
    assert seen["bad_images"] == ["bad"] and seen["bad_media"] == ["error 4"] and seen["errors"], seen
    runs = {"image": tiny_runs["a0"].path, **modality_runs}
    for kind, run in runs.items():
        report = tmp_path / f"{kind}.html"
        assert main(["report", str(run), "-o", str(report), "-q"]) == 0
        result = browser_check(report, tmp_path / f"{kind}.png")
        assert result["images"] >= 2 and result["bad_images"] == [], (kind, result)  # curves, samples
        assert result["bad_media"] == [] and result["errors"] == [] and result["console"] == [], (kind, result)
        assert result["media"] == (4 if kind == "audio" else 0)
    keep = os.environ.get("ALIGNKIT_REPORT_SCREENSHOTS")  # where to keep the screenshots for a look
    if keep:
        shutil.copytree(tmp_path, keep, dirs_exist_ok=True)


def test_large_image_samples_are_inlined_smaller(tmp_path: Path) -> None:
    Image.new("RGB", (1024, 512), "red").save(tmp_path / "big.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "small.png")
    big, small = (render_sample(tmp_path, {"file": name}) for name in ("big.png", "small.png"))
    data = base64.b64decode(re.search(r"base64,([^\"]+)", big).group(1))
    assert Image.open(io.BytesIO(data)).size == (384, 192) and 'width="384"' in big
    assert 'class="pixels" width="128"' in small  # a tiny world's sample is drawn larger, pixels kept sharp
    assert render_sample(tmp_path, {"file": "gone.png"}) == '<span class="note">missing file gone.png</span>'
