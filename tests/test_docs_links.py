"""Every relative link in README.md and docs/*.md resolves: the file or folder exists and a #anchor
names a heading of the page it points to (GitHub's heading ids). The README stays short, the guide
index lists every guide, and the docs pages that code and configs point users to exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's id for a heading: link text kept, code marks and punctuation dropped, lower case,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [m.group(2) for m in LINK.finditer(FENCE.sub("", page.read_text()))]


def test_slug_follows_github():
    assert slug("MT-Bench (`selm eval mtbench`)") == "mt-bench-selm-eval-mtbench"
    assert slug("The model cache (`SELM_CACHE`)") == "the-model-cache-selm_cache"
    assert slug("Time and result, measured") == "time-and-result-measured"
    assert slug("The paper's findings, tested") == "the-papers-findings-tested"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, bad


def test_the_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_index_and_the_readme_list_every_guide():
    index, readme = links(ROOT / "docs" / "README.md"), links(ROOT / "README.md")
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert page.name in index, page.name
            assert f"docs/{page.name}" in readme, page.name


def test_the_docs_pages_that_code_and_configs_name_exist():
    files = [*ROOT.glob("selm/**/*.py"), *ROOT.glob("selm/**/*.yaml"), *ROOT.glob("configs/**/*.yaml"),
             *ROOT.glob("scripts/*"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*")]
    named = {m for f in files if f.is_file() for m in re.findall(r"docs/[\w.-]+\.md", f.read_text())}
    assert "docs/vllm.md" in named  # the vLLM install hint
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
