"""Examples in the README and the docstrings run and say what they claim."""

import doctest
import importlib
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules_with_examples():
    """Every drmm_kernels module whose source holds a docstring example (found by file, so moves need no edit)."""
    names = []
    for path in sorted((ROOT / "drmm_kernels").rglob("*.py")):
        if ">>>" in path.read_text():
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_examples_found():
    assert {"drmm_kernels", "drmm_kernels.layers"} <= set(MODULES) and len(MODULES) >= 3, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch"),
                                                 "nn": importlib.import_module("torch.nn")}, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    scope = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["x_hat"].shape == scope["x"].shape
    report = str(scope["fused"].fuse_report)
    assert "8 fused, 0 refused" in report, report
    assert scope["saliency"].shape == (1, 64, 64) and scope["saliency"].max() > 0


# ---------------------------------------------------------------- the repository stands alone

# Built by concatenation so that this file does not contain the strings it forbids.
FORBIDDEN = ("model" + "-spec", "DESIGN" + ".md", "kernel" + "-notes", "shared" + "/docs")


def _tracked_files():
    """Paths of the git-tracked files (skips when this is not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    return [ROOT / p for p in out.decode().split("\0") if p]


# The files below were fixed in the working tree by the helpers restructuring them, but not yet committed when this
# test was; remove the mark once `git grep` finds nothing at HEAD.
def test_no_citations_of_files_outside_the_repository():
    """No tracked file outside .ci/ names the background notes that are not part of the repository."""
    offenders = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(".ci/") or not path.is_file():
            continue
        data = path.read_bytes()
        offenders += [f"{rel}: {s}" for s in FORBIDDEN if s.encode() in data]
    assert not offenders, "files citing documents outside the repository:\n" + "\n".join(offenders)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading.strip()).lower()  # inline markup and link targets
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def doc_anchors(path: pathlib.Path) -> set:
    """Anchors of every heading of a markdown file (code blocks skipped, repeated headings numbered)."""
    anchors, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_slug():
    assert github_slug("Total loss and batch composition") == "total-loss-and-batch-composition"
    assert github_slug("Hard EM, EG and backprop, and clustering") == "hard-em-eg-and-backprop-and-clustering"
    assert github_slug("Options (`kl_sign`, `td_nonneg`)") == "options-kl_sign-td_nonneg"


# Sections other files cite by anchor; renaming one of these headings breaks links across the code base.
MODEL_SECTIONS = ("the-generative-model", "bottom-up-inference", "switches", "top-down-rendering", "class-templates",
                  "nrm-flavour", "loss-terms", "total-loss-and-batch-composition", "loss-weights", "eg-training",
                  "hard-em", "architectures-and-protocol", "nrm-architectures", "reported-results", "variants",
                  "sampling-and-generation", "implementation-pitfalls", "paper-vs-code", "evaluation-protocol")
KERNEL_SECTIONS = ("code-layout", "roofline", "triton-interpreter", "building-the-cuda-extension", "benchmarking",
                   "pitfalls")


def test_cited_sections_exist():
    assert set(MODEL_SECTIONS) <= doc_anchors(ROOT / "docs" / "model.md")
    assert set(KERNEL_SECTIONS) <= doc_anchors(ROOT / "docs" / "kernels.md")


def test_doc_anchors_cited_anywhere_exist():
    """Every `docs/<page>.md#anchor` (or `<page>.md#anchor` inside docs/) in a tracked file names a real heading."""
    pages = {p.name: doc_anchors(p) for p in (ROOT / "docs").glob("*.md")}
    link = re.compile(r"(?<![\w./-])(?:(?:\.\./)?docs/)?([\w-]+\.md)#([\w-]+)")
    broken = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if not path.is_file() or path.suffix in (".png", ".npy", ".json", ".csv"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for m in link.finditer(text):
            page, anchor = m.groups()
            in_docs = m.group(0).startswith(("docs/", "../docs/")) or rel.startswith("docs/")
            if in_docs and page in pages and anchor not in pages[page]:
                broken.append(f"{rel}: {m.group(0)}")
    assert not broken, "links to missing doc sections:\n" + "\n".join(broken)
