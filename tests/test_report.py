"""nafnet-edge report: one self-contained HTML page per conversion directory that says what to ship, checked in a
real headless browser.

The browser is Debian's chromium (``.ci/run`` installs it), driven by the ``playwright`` package with
``executable_path`` (never ``playwright install``: nothing is downloaded). Without chromium the browser test fails
in CI (``CI=true``) and is skipped elsewhere.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path

import cv2
import pytest
from helpers import KODAK, Converted, require

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT

require("onnxruntime")
require("openvino")

# Core ML validates through the MIL numpy evaluator off macOS: a third runtime and an fp16 row when installed.
TARGETS = ["onnx", "openvino"] + (["coreml"] if importlib.util.find_spec("coremltools") else [])
IMAGES = 2
PAGE_BYTES_PER_ARTIFACT = 60_000  # measured about 25 kB per artifact with two images (charts and table included)

BENCH = {  # bench.json as `nafnet-edge bench --save` writes it (schema: nafnet_edge.manifest.BenchRecord), by hand
    "bench_version": 2,
    "created": "2026-11-25T04:00:00Z",
    "machine": {"cpu": "Test CPU", "cores": 2, "platform": "Linux", "sgemm_gflops": 185.3},
    "settings": {"iters": 20, "warmup": 3, "threads": None, "frame": None},
    "directory": "out/openvino",
    "target": "openvino",
    "precision": "fp32",
    "runtime": "openvino",
    "runnable": True,
    "reason": None,
    "input": [1, 3, 64, 64],
    "info": {"inference_precision": "f32"},
    "load_s": 0.41,
    "first_inference_ms": 3.2,
    "latency_ms": {"min": 1.1, "median": 1.375, "mean": 1.4, "p90": 1.6, "p99": 1.9, "std": 0.1, "runs": [1.4]},
    "throughput": {"fps": 1400.5, "streams": 2, "requests": 2, "frames": 20},
    "peak_rss_mb": 412.0,
    "gmacs": 0.02,
    "gflops_per_s": 30.8,
    "peak_fraction": 0.17,
    "frame": None,
    "profile": {
        "source": "OpenVINO performance counters",
        "total_ms": 1.2,
        "top": [{"op": "Convolution brgconv_avx512", "ms": 0.6, "share": 0.5, "count": 39}],
    },
    "baseline": {"runtime": "pytorch", "median_ms": 4.5},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """The session's tiny model converted to each target at 64 px, validated on two Kodak crops (copied, only
    ``TARGETS``); openvino benchmarked."""
    out = tmp_path_factory.mktemp("report") / "out"
    for target in TARGETS:
        shutil.copytree(converted_artifacts.dir(target), out / target)
    (out / "openvino" / "bench.json").write_text(json.dumps(BENCH))
    return out


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr class="artifact.*?</tr>', page, flags=re.S)


def _scales(page: str) -> list[str]:
    """The amplification of each difference image, and of the printed scale bar (``data-scale``)."""
    return re.findall(r'data-scale="([^"]+)"', page)


def _shipped(page: str) -> dict[str, str]:
    """The 'what to ship' cards: target -> the artifact the page says to ship."""
    cards = re.findall(r'<section class="target-card" data-target="([^"]+)">(.*?)</section>', page, flags=re.S)
    return {t: m[1] for t, card in cards if (m := re.search(r'class="pick">Ship <a[^>]*><strong>([^<]+)<', card))}


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_report_is_one_self_contained_page_that_renders_in_chromium(converted: Path, tmp_path: Path) -> None:
    html_path = tmp_path / "report.html"
    assert main(["report", str(converted), "-o", str(html_path), "--images", str(IMAGES)]) == 0
    page = html_path.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # written atomically

    # one row per artifact, with what the manifests and bench.json say
    rows = _rows(page)
    assert [re.search(r'data-target="([^"]+)"', r)[1] for r in rows] == sorted(TARGETS)
    by_target = dict(zip(sorted(TARGETS), rows, strict=True))
    assert "1.4 ms" in by_target["openvino"] and "1400.5 fps" in by_target["openvino"]  # median 1.375, rounded
    assert "not benchmarked (run <code>nafnet-edge bench" in by_target["onnx"]
    for target, row in by_target.items():
        manifest = json.loads((converted / target / "manifest.json").read_text())
        assert f"{manifest['validation']['summary']['fidelity_db_min']:.1f} dB" in row
        assert manifest["precision"] in row and "pass" in row and "KiB" in row

    # self-contained: charts are inline SVG, images embedded PNGs, nothing refers to the network
    assert page.count("<svg") == 2  # latency per artifact, quality against latency
    images = re.findall(r"<img[^>]*>", page)
    assert len(images) == IMAGES * (2 + 2 * len(TARGETS))  # input, reference; per artifact output, difference
    assert all('src="data:image/png;base64,' in tag for tag in images)
    without_namespaces = re.sub(r'xmlns(:\w+)?="http://www\.w3\.org/[^"]*"', "", page)
    assert "http://" not in without_namespaces and "https://" not in without_namespaces
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert _scales(page) == [_scales(page)[0]] * (IMAGES * len(TARGETS) + 1)  # one scale for every difference
    assert f"difference ×{_scales(page)[0]}, one scale for every artifact" in page  # and the page prints it
    assert _shipped(page) == {t: t for t in TARGETS}  # each passed, the only artifact of its target
    assert len(page.encode()) < PAGE_BYTES_PER_ARTIFACT * len(TARGETS)

    _check_in_chromium(html_path, tmp_path / "report.png", artifacts=len(TARGETS), images=len(images))


@pytest.fixture(scope="module")
def fp32_and_int8(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """onnx fp32 and openvino fp32 (the shared artifacts, copied) and openvino int8 (PTQ of the same tiny model
    at 64 px, validated on the same crops) in one OUT, laid out as convert writes it; both openvino artifacts
    benchmarked (bench.json by hand: int8 the faster, a PyTorch baseline far slower than any artifact), onnx not."""
    out = tmp_path_factory.mktemp("fp32-int8") / "out"
    shutil.copytree(converted_artifacts.dir("onnx"), out / "onnx-fp32")
    shutil.copytree(converted_artifacts.dir("openvino"), out / "openvino-fp32")
    args = ["quantize", str(converted_artifacts.checkpoint), "--target", "openvino", "--method", "ptq"]
    args += ["--train-data", str(KODAK), "--val-data", str(converted_artifacts.data), "--input-size", "64"]
    args += ["--inference-precision", "f32"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFNET_EDGE_CACHE", str(out.parent / "cache"))
        assert main([*args, "-o", str(out), "--quiet"]) == 0
    int8 = json.loads((out / "openvino-int8" / "manifest.json").read_text())["export"]
    assert (int8["inference_precision"], int8["inference_precision_choice"]) == ("f32", "asked for (f32)")
    for name, median in (("openvino-fp32", 1.375), ("openvino-int8", 0.9)):
        manifest = json.loads((out / name / "manifest.json").read_text())
        bench = {**BENCH, "directory": f"out/{name}", "precision": manifest["precision"]}
        bench["latency_ms"] = {**BENCH["latency_ms"], "median": median}
        bench["baseline"] = {"runtime": "pytorch", "median_ms": 5500.0}  # a loaded machine: seconds per call
        (out / name / "bench.json").write_text(json.dumps(bench))
    return out


def test_the_report_says_what_to_ship_over_fp32_and_int8_of_two_targets(fp32_and_int8: Path, tmp_path: Path) -> None:
    html_path = tmp_path / "report.html"
    code = main(["report", str(fp32_and_int8), "-o", str(html_path), "--images", str(IMAGES)])
    assert code == 0
    page = html_path.read_text(encoding="utf-8")
    artifacts = ["onnx-fp32", "openvino-fp32", "openvino-int8"]

    # per target the fastest artifact that passed; unbenchmarked onnx ranked by size, and the page says so
    assert _shipped(page) == {"onnx": "onnx-fp32", "openvino": "openvino-int8"}
    openvino = re.search(r'data-target="openvino">(.*?)</section>', page, flags=re.S)[1]
    assert re.findall(r"<thead><tr><th></th>(.*?)</tr>", openvino)[0].count("<th") == 2  # fp32, int8 side by side
    assert "slower: 1.38 ms against 0.90 ms" in openvino  # why openvino-fp32 lost
    onnx = re.search(r'data-target="onnx">(.*?)</section>', page, flags=re.S)[1]
    assert "Not benchmarked: ranked by size" in onnx

    # table rows grouped by target, fp32 before int8
    rows = _rows(page)
    assert [
        (re.search(r'data-target="([^"]+)"', r)[1], re.search(r'data-precision="([^"]+)"', r)[1]) for r in rows
    ] == [
        ("onnx", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "int8"),
    ]

    # the baseline is a reference (here: far off the scale, named in a note), never a bar of the latency chart
    latency_svg = re.findall(r"<svg.*?</svg>", page, flags=re.S)[0]
    assert "PyTorch fp32: 5500 ms, off the scale" in latency_svg
    assert "baseline" not in re.sub(r"PyTorch fp32: 5500 ms, off the scale", "", latency_svg).lower()

    # one comparison per image with all three artifacts, every difference on one printed scale
    scales = _scales(page)
    assert len(scales) == IMAGES * len(artifacts) + 1 and len(set(scales)) == 1
    assert f"difference ×{scales[0]}, one scale for every artifact" in page
    peaks = [float(v) for v in re.findall(r"max ([0-9.e+-]+)/255", page)]
    assert len(peaks) == IMAGES * len(artifacts)
    assert max(peaks) * int(scales[0]) <= 255 < max(peaks) * int(scales[0]) * 2  # the scale fits the largest
    assert len(page.encode()) < PAGE_BYTES_PER_ARTIFACT * len(artifacts)

    images = re.findall(r"<img[^>]*>", page)
    assert len(images) == IMAGES * (2 + 2 * len(artifacts))
    _check_in_chromium(html_path, tmp_path / "report.png", artifacts=len(artifacts), images=len(images))


def _check_in_chromium(html_path: Path, screenshot: Path, *, artifacts: int, images: int) -> None:
    """Render the page in headless chromium: no console errors, no network request, one table row per artifact,
    every image decoded; the full-page screenshot is kept next to the page."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("playwright is missing: pip install -e '.[test]'")
        pytest.skip("playwright is missing: pip install -e '.[test]'")
    url = html_path.resolve().as_uri()
    console: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            )
            page.on("pageerror", lambda e: console.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: console.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("data:") else None)
            page.goto(url, wait_until="load")
            rows = page.locator("table.artifacts tbody tr").count()
            loaded = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)"
            )
            charts = page.eval_on_selector_all("svg", "s => s.map(e => e.getBoundingClientRect().width)")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert console == []
    assert requests == [url]  # the page itself and nothing else
    assert rows == artifacts
    assert len(loaded) == images and all(loaded)
    assert len(charts) == 2 and min(charts) > 200
    shot = cv2.imread(str(screenshot))
    assert shot is not None and shot.shape[1] == 1280 and shot.shape[0] > 900
    print(f"screenshot: {screenshot}")


def test_a_single_artifact_directory_without_bench_json_says_it_was_not_benchmarked(
    converted: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(converted / "onnx", folder)
    assert main(["report", str(folder), "--images", "0", "--data", str(tmp_path)]) == 0  # the old --val-data
    assert "--data is deprecated, use --val-data" in capsys.readouterr().err
    page = (folder / "report.html").read_text(encoding="utf-8")  # default output: DIR/report.html
    (row,) = _rows(page)
    assert 'data-target="onnx"' in row and "not benchmarked" in row
    assert f"nafnet-edge bench {folder} --save" in page
    assert "No latency chart" in page and "<img" not in page
    assert _shipped(page) == {"onnx": "onnx"} and "Not benchmarked: ranked by size" in page


def test_the_operator_table_renders_from_the_bench_json_that_bench_writes(converted: Path, tmp_path: Path) -> None:
    """Real `bench --save` and then the report: the details section lists the operators bench.json records."""
    folder = Path(shutil.copytree(converted / "onnx", tmp_path / "onnx"))
    assert main(["bench", str(folder), "--runs", "2", "--warmup", "0", "--no-baseline", "--save"]) == 0
    profile = json.loads((folder / "bench.json").read_text())["profile"]
    ops = [row["op"] for row in profile["top"]]
    assert ops and "ops" not in profile  # one key for the operators, the one the report reads
    assert main(["report", str(folder), "--images", "0"]) == 0
    page = (folder / "report.html").read_text(encoding="utf-8")
    table = re.search(r"<h4>Top operators \((.*?), total .*?</h4>(.*?)</table>", page, flags=re.S)
    assert table is not None, "no operator table"
    assert table.group(1) == profile["source"]
    assert re.findall(r"<tr><td>(.*?)</td>", table.group(2)) == [html.escape(op) for op in ops[:10]]


def test_an_artifact_that_cannot_run_here_keeps_its_row_with_the_reason(converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted / "onnx", out / "onnx")
    shutil.copytree(converted / "openvino", out / "openvino")
    (out / "onnx" / "model.onnx").write_bytes(b"not an onnx model")
    assert main(["report", str(out), "--images", "1"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert len(_rows(page)) == 2
    assert "onnx</strong>: no images, cannot run here" in page
    assert len(re.findall(r"<img", page)) == 2 + 2  # input, reference and openvino's output and difference


@pytest.mark.parametrize("kind", ["missing", "no manifest"])
def test_a_directory_without_a_manifest_exits_5_with_one_line(kind: str, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "nothing-here"
    if kind == "no manifest":
        (folder / "onnx").mkdir(parents=True)
        (folder / "onnx" / "model.onnx").write_bytes(b"")
    assert main(["report", str(folder)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err
    assert "nafnet-edge convert" in err
    assert not (folder / "report.html").exists()


@pytest.fixture(scope="module")
def tensor_and_image(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """onnx fp32 (the shared artifact, copied) and its image-I/O twin (``convert --io image --pixel-format rgba``
    of the same tiny model at 64 px, validated on the same crops) in one OUT, as convert lays them out."""
    out = tmp_path_factory.mktemp("tensor-image") / "out"
    shutil.copytree(converted_artifacts.dir("onnx"), out / "onnx-fp32")
    args = ["convert", str(converted_artifacts.checkpoint), "--target", "onnx", "--io", "image"]
    args += ["--pixel-format", "rgba", "--input-size", "64", "--val-data", str(converted_artifacts.data)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFNET_EDGE_CACHE", str(out.parent / "cache"))
        assert main([*args, "-o", str(out), "--quiet"]) == 0
    return out


def _agreement(summary: dict) -> tuple[str, str]:
    """The 8-bit agreement as the page writes it: the least share within one level (rounded down to 0.01%) and
    the largest difference."""
    within = f"{math.floor(summary['within_one_level_share_min'] * 10000) / 100:.2f}".rstrip("0").rstrip(".")
    worst = summary["max_level_diff"]
    return f"{within}% within 1 level", f"max {worst} level{'s' * (worst != 1)}"


def test_the_report_shows_each_artifacts_io_and_the_8_bit_agreement_of_image_io(
    tensor_and_image: Path, tmp_path: Path
) -> None:
    html_path = tmp_path / "report.html"
    assert main(["report", str(tensor_and_image), "-o", str(html_path), "--images", "1"]) == 0
    page = html_path.read_text(encoding="utf-8")
    tensor, image = _rows(page)
    validations = {
        name: json.loads((tensor_and_image / name / "manifest.json").read_text())["validation"]
        for name in ("onnx-fp32", "onnx-fp32-image")
    }
    # every validation scores the 8-bit agreement; only image I/O has a budget for it (and passed it)
    within, worst = _agreement(validations["onnx-fp32"]["summary"])
    assert '<td data-io="tensor">tensor<div class="small muted">' in tensor
    assert f"{within} · {worst}" in tensor and "(≥" not in tensor
    image_validation = validations["onnx-fp32-image"]
    assert image_validation["passed"] and image_validation["budgets"]["min_within_one_level"] == 0.999
    within, worst = _agreement(image_validation["summary"])
    assert '<td data-io="image rgba">image rgba<div class="small muted">' in image
    assert f"{within} (≥ 99.9%) · {worst}" in image
    details = re.search(r'id="artifact-onnx-fp32-image">(.*?)</details>', page, flags=re.S)[1]
    assert "≥ 99.9% of 8-bit samples within one level" in details  # the budget, with the others
    assert re.search(r"equal to the reference in [0-9.]+% of samples \(mean\)", details)
    assert "image: uint8 NHWC [1,64,64,4] RGBA" in details
    card = re.search(r'data-target="onnx">(.*?)</section>', page, flags=re.S)[1]
    assert re.findall(r"<thead><tr><th></th>(.*?)</tr>", card)[0].count(">fp32 image<") == 1  # told apart
    # with an image-I/O artifact on the page, the compared tiles are 8-bit pixels, and the page says so
    assert "rounded to 8 bits (what image I/O takes)" in page
    assert len(re.findall(r"<img", page)) == 2 + 2 * 2
