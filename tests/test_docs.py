"""The documentation holds together: the README is a front door (short, every measured figure next to
the docs/results page it comes from), every relative link resolves, every figure in docs/ is shown
somewhere."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    text = "\n".join(lines)
    assert text.index("make train SELECTOR=gumbel_ae") < text.index("## ")  # the two commands come first
    assert "make test" in text[:text.index("## ")]


def test_every_measured_figure_in_the_readme_names_its_results_page():
    lines = (REPO / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if "±" in line:  # a measured mean with its interval
            nearby = "\n".join(lines[max(0, i - 20):i + 4])
            assert "docs/results/" in nearby, f"README line {i + 1} has a figure without its results page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to a missing {target}"


def test_every_figure_in_docs_is_shown_somewhere():
    shown = {(page.parent / t).resolve() for page in PAGES for t in LINK.findall(page.read_text())}
    for png in (REPO / "docs").rglob("*.png"):
        assert png.resolve() in shown, f"{png.relative_to(REPO)} is referenced nowhere"

