"""The front door: README.md short, docs/ one page per topic, every link between them resolving (files and
#anchors), and `nanokimi` with no arguments showing the commands and where to start."""

import re
import subprocess

import pytest

from tests.conftest import NANOKIMI, ROOT

PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
TOPICS = {"data", "training", "chat", "serving", "distributed", "interop", "reliability", "benchmarks", "architecture"}


def anchors(path):
    """GitHub's anchors of a markdown file: each heading's slug (lowercase, punctuation dropped, spaces to '-')."""
    text = path.read_text()
    slugs = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    }
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
        result = subprocess.run([*NANOKIMI, *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        for command in (
            "prepare",
            "train",
            "sample",
            "chat",
            "serve",
            "eval",
            "plot",
            "export",
            "import",
            "torchrun",
            "bench",
        ):
            assert re.search(rf"^    {command} +\S", result.stdout, re.M), (command, result.stdout)
        assert "start here" in result.stdout and "nanokimi train shakespeare-char-cpu" in result.stdout


# README figures copied (rounded) from a BENCHMARKS.md section: (README text, section, the section's text it rests
# on). Rerunning a benchmark that changes one fails here until the README says the new figure.
COPIED = [
    (
        "3.20x the aggregate tokens/s of one at a time (669.8 vs 209.1), each stream equal to its request run alone; "
        "first token 58 ms p50",
        "serve-avx512-bf16",
        ["| 1 | 209.1 | 1.00x |", "| 16 | 669.8 | 3.20x | 58 | 285 | 96/96 |"],
    ),
    (
        "reaches the recipe's val loss (1.91) in **~0.30x** of its time; in the recipe's time, 1.65",
        "compare-cpu-avx512-bf16",
        [
            "~0.30x interpolated",
            "| 1x | 101.5 (97.8..105.9) | 2000 (2000..2000) | 1.9079 (",
            "| 1x | 101.6 (101.5..101.6) | 975 (878..1067) | 1.6482 (",
        ],
    ),
    (
        "Muon the most (0.15 in val loss at 40 s, 0.13 at equal tokens); the sparse MoE does not pay on "
        "TinyShakespeare: it loses at 40 s, ties per token and at 120 s",
        "ablate-avx512-bf16",
        [
            "| 1.7916 (1.7672..1.8205) | 2.0749 (2.0709..2.0789) | 1.6223 (",
            "| 1.7335 (1.7277..1.7411) | 2.0757 (2.0630..2.0943) | 1.6059 (",
            "| 1.9445 (1.9071..1.9701) | 2.2030 (",
        ],
    ),
    (
        "leads at 40 min (3.919 vs 3.953 dense, one seed)",
        "ablate-gutenberg-bpe-cpu-dense-avx512-bf16-amx",
        ["reaches 3.9190, every layer dense 3.9532"],
    ),
    (
        "wins per token (1.88 vs 2.00) and loses at equal time (1.836 vs 1.799 at 40 s), its steps 1.6x slower",
        "ablate-kda-avx512-bf16",
        ["1.8833 vs 1.9998 at equal tokens", "1.8361 vs 1.7991 at 40 s", "| 16x64 | 101 |", "| 16x64 | 163 |"],
    ),
    (
        "93.3% exact on held-out multi-digit arithmetic through the calculator tool (0% without it); plain turns 50%",
        "chat-avx512-bf16",
        [
            "| arithmetic, calculator on | 112/120 | 93.3% |",
            "| arithmetic, calculator off | 0/120 |",
            "| plain turns (no tool needed) | 40/80 | 50.0% |",
            "840.7 s of training",
        ],
    ),
    (
        "265 tokens/s vs 33 for the uncached nanoGPT baseline (7.9x); KV cache 160 B vs 640 B",
        "inference",
        [
            "| 1024 | nanoKimi, MLA cache | 54 | 265 |",
            "| 1024 | nanoGPT baseline, no cache | 28 | 33 |",
            "at context 1024: 7.9x",
        ],
    ),
    (
        "prefill in 0.42x MLA's time, decode 1.76x as fast, KDA states fixed at 62 KiB; a tie at 4k, slower at 1k "
        "(1.35x MLA's prefill, 0.92x its decoding)",
        "long-context-avx512-bf16",
        [
            "decodes 1.76x as fast as MLA everywhere and prefills in 0.42x its time",
            "| 32768 | KDA hybrid 3:1 (Kimi Linear) | 5.81 | 117 | - | 10,312 | 62 |",
            "1,024: 1.35x / 0.92x, 4,096: 1.01x / 1.30x",
        ],
    ),
    (
        "FSDP2 x2: 0.50x of one process's; with expert parallelism 33.8 + 11.3 + 7.5 MiB sent per rank per step vs "
        "123.8 + 56.3 for FSDP2 alone",
        "memory",
        [
            "measured 0.50x",
            "| FSDP+EP x2 | measured | 33.837 | 11.348 | 7.497 |",
            "| FSDP x2 | measured | 123.837 | 56.348 |",
        ],
    ),
]


@pytest.mark.parametrize("readme_text, section, sources", COPIED, ids=[c[1] for c in COPIED])
def test_readme_figures_are_the_benchmark_sections(readme_text, section, sources):
    bench = (ROOT / "BENCHMARKS.md").read_text()
    sections = dict(re.findall(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", bench, re.S))
    assert readme_text in (ROOT / "README.md").read_text()
    assert all(source in sections[section] for source in sources), [s for s in sources if s not in sections[section]]


def test_the_layout_table_names_every_module_of_the_package():
    """docs/architecture.md's layout is where a newcomer looks for a file: every module of nanokimi/ (and of its
    sub-packages, by their folder) is named there, and nothing it names is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text[text.index("## Layout") :]
    named = set(re.findall(r"`([\w/]+\.py)`", layout)) | set(re.findall(r"`([\w]+/)`", layout))
    package = ROOT / "nanokimi"
    modules = {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    folders = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert modules | folders <= named, sorted((modules | folders) - named)
    places = [package, *(p for p in package.iterdir() if p.is_dir()), ROOT / "tests", ROOT / "scripts", ROOT]
    gone = {n for n in named if not any((place / n).exists() for place in places)}
    assert not gone, sorted(gone)
