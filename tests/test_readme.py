"""The README's Python examples run as written, and its links into docs/ (and the docs' own links) resolve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def local_links(path: Path) -> list[tuple[Path, str]]:
    """(target file, anchor) for every relative link of a Markdown file; URLs are left out."""
    links = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        links.append(((path.parent / file).resolve(), anchor))
    return links


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a Markdown file's headings, plus explicit <a id="..."> ones."""
    text = path.read_text()
    text_outside_code = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found = set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#{1,6} (.+)$", text_outside_code, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path: Path) -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no Python example"
    env = {**os.environ, "NAFNET_EDGE_CACHE": str(tmp_path / "cache")}
    for i, code in enumerate(blocks):
        work = tmp_path / f"block{i}"
        work.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=1800
        )
        assert done.returncode == 0, f"README Python block {i} failed:\n{code}\n{done.stdout}\n{done.stderr}"


def test_readme_and_index_link_to_existing_docs() -> None:
    for page in (README, DOCS / "index.md"):
        targets = [file for file, _ in local_links(page)]
        docs = [file for file in targets if file.parent == DOCS]
        assert docs, f"{page.name} links to no page of docs/"
        for file in targets:
            assert file.is_file(), f"{page.name} links to {file.relative_to(ROOT)}, which does not exist"


def test_index_lists_every_docs_page() -> None:
    listed = {file.name for file, _ in local_links(DOCS / "index.md")}
    for page in sorted(DOCS.glob("*.md")):
        assert page.name == "index.md" or page.name in listed, f"docs/index.md does not list {page.name}"


def test_docs_links_and_anchors_resolve() -> None:
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for file, anchor in local_links(page):
            assert file.exists(), f"{page.name} links to {file}, which does not exist"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.name} links to {file.name}#{anchor}: no such heading"


def test_model_card_figures_match_the_weights_metadata() -> None:
    card = (DOCS / "model-card.md").read_text()
    for meta in sorted((ROOT / "nafnet_edge" / "weights").glob("nafnet-edge-denoise-*.json")):  # SR: test_sr_run
        data = json.loads(meta.read_text())
        assert meta.name in card
        for sigma, figures in data["kodak24"].items():
            noisy, restored = figures["noisy_psnr_db"], figures["restored_psnr_db"]
            row = f"| {sigma} | {noisy:.2f} dB | {restored:.2f} dB | +{restored - noisy:.2f} dB |"
            assert row in card, f"model-card.md lacks {row}"
        training = data["training"]
        assert f"{training['iters']} iterations, batch {training['batch']}" in card
        assert f"{training['crop']}-px crops" in card
