"""The front door: README.md short, docs/ one page per topic, every link between them resolving (files and
#anchors), and `nanokimi` with no arguments showing the commands and where to start."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
TOPICS = {"data", "training", "distributed", "interop", "reliability", "benchmarks", "architecture"}


def anchors(path):
    """GitHub's anchors of a markdown file: each heading's slug (lowercase, punctuation dropped, spaces to '-')."""
    text = path.read_text()
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)}
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def test_readme_is_short_and_every_topic_has_a_page():
    assert len((ROOT / "README.md").read_bytes()) <= 12_500
    assert {p.stem for p in (ROOT / "docs").glob("*.md")} == TOPICS


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: {target} -> {path} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: #{anchor} is not a heading of {path.name}"


def test_nanokimi_alone_lists_the_commands_and_where_to_start():
    for args in ([], ["--help"]):
        result = subprocess.run([sys.executable, "-m", "nanokimi", *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        for command in ("prepare", "train", "sample", "eval", "plot", "export", "import", "torchrun", "bench"):
            assert re.search(rf"^    {command} +\S", result.stdout, re.M), (command, result.stdout)
        assert "start here" in result.stdout and "nanokimi train shakespeare-char-cpu" in result.stdout
