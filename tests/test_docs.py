"""Every Python block of the README and of docs/ runs (on the CPU through the interpreter, as written: the examples
pick their device and use small shapes), each page's blocks in order in one namespace, as a reader would paste
them. A block that cannot run has a line `<!-- not run: why -->` right above its fence."""
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^(\s*)```python\s*$")
NOT_RUN = re.compile(r"^\s*<!-- not run: (.+\S) -->\s*$")


def blocks(page: Path):
    """(first line number, source, reason it is not run or None) of each ```python block."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        skip = NOT_RUN.match(lines[i - 1]) if i else None
        found.append((i + 1, textwrap.dedent("\n".join(lines[i + 1:end])), skip and skip.group(1)))
        i = end + 1
    return found


def test_every_page_is_found_and_linked():
    assert len(PAGES) >= 11
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README does not link {page.name}"
    for page in PAGES:
        for link in re.findall(r"\]\(([^)#:]+\.(?:md|png))", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: broken link {link}"


@pytest.mark.parametrize("page", [pytest.param(p, id=p.name) for p in PAGES if blocks(p)])
def test_python_blocks_run(page):
    namespace = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for line, source, reason in blocks(page):
        if reason:
            continue
        try:
            exec(compile(source, f"{page.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, the block at line {line}: {type(e).__name__}: {e}") from e
        ran += 1
    assert ran, f"{page.name}: every Python block is marked not run"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 10_000, len(text)
    assert text.count("python3 -m venv .venv") == 2  # the two commands


def test_files_the_code_points_to_exist():
    """Comments and docstrings that send a reader to a page name one the repository has (they once pointed to a
    design page that was not in it)."""
    sources = [p for d in ("fused_attn", "bench", "tests") for p in (ROOT / d).rglob("*.py")]
    sources += [ROOT / "setup.py", ROOT / "bench" / "gpu_session.sh"]
    for path in sources:
        for name in re.findall(r"[\w./-]*\w\.md\b", path.read_text()):
            assert (ROOT / name).exists() or (ROOT / "docs" / name).exists(), f"{path.relative_to(ROOT)}: {name}"


def test_no_top_level_shadowing():
    """No folder at the checkout's root takes the import name of an installed distribution other than ours: run
    from the root (`python -m pytest tests`), Python finds the folder first. A top-level `kernels/` once shadowed
    Hugging Face's `kernels`, which transformers imports, and broke every transformers test."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    folders = [p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()]
    assert "fused_attn" in folders and "kernels" not in folders
    clashes = {name: owners[name] for name in folders
               if name in owners and {d.lower().replace("_", "-") for d in owners[name]} != {"fused-attn"}}
    assert not clashes, f"top-level folders that shadow installed packages: {clashes}"
