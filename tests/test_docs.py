"""Examples in the documentation and the docstrings run and say what they claim."""

import contextlib
import dataclasses
import doctest
import functools
import importlib
import io
import json
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest
import torch

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
    result = doctest.testmod(
        module,
        extraglobs={"torch": importlib.import_module("torch"), "nn": importlib.import_module("torch.nn")},
        verbose=False,
    )
    assert result.attempted > 0 and result.failed == 0, result


def test_public_api_has_examples():
    """Every name drmm_kernels exports is used in one of the docstring examples above."""
    finder, used = doctest.DocTestFinder(), ""
    for name in MODULES:
        for test in finder.find(importlib.import_module(name)):
            used += "".join(example.source + example.want for example in test.examples)
    missing = [name for name in importlib.import_module("drmm_kernels").__all__ if not re.search(rf"\b{name}\b", used)]
    assert not missing, f"public names without a docstring example: {missing}"


# ---------------------------------------------------------------- the code blocks of the documentation
#
# Every fenced block of README.md, docs/*.md and experiments/README.md is collected. A ```python block runs on its
# own, in a fresh namespace. A ```bash block is split into commands, one test each, in the block's own working
# folder (symlinks to the repository's top-level folders, so `configs/...` resolves and `runs/` starts empty):
#
# * run: `drmm ... --help`; `drmm train`, cut to 2 steps of 20 images (TRAIN_OVERRIDES); `drmm eval` / `render` /
#   `sample` on the run the block trained (`runs/<name>` is the last one it trained); `python -m drmm ...` likewise; and
#   `pytest-benchmark compare` / `list` on two small JSON files that keep the paths' relative or absolute form.
#   The drmm commands run in this process on MNIST (DRMM_DATA_DIR) with the test set cut to its first
#   TEST_IMAGES images, so that scoring a run takes a second;
# * checked, not run (NOT_RUN says why; the test is reported as skipped with that reason): every `--flag` must be an
#   option of the command (argparse for drmm, the script's source, pytest's or pip's options, a Makefile target and
#   its variables) and every repository path it names must exist (an output path: its folder).
#
# `<!-- docs-test: skip (reason) -->` on the line before a fence runs nothing of that block: a python block is only
# compiled, a bash block's commands are only checked; the reason is the skip message.

DOC_FILES = (
    "README.md",
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
    "experiments/README.md",
)
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")  # a line of its own
SKIP_MARKER = re.compile(r"\s*skip\s*\((.+)\)\s*$")
LANGUAGES = {"python", "bash", ""}  # "" = plain text (diagrams, output), never run


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to ROOT
    line: int  # line number of the block's first line of code
    lang: str
    text: str
    skip: Optional[str]  # the marker's reason, or None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def code_blocks(rel: str, text: Optional[str] = None) -> Tuple[List[Block], List[str]]:
    """The fenced blocks of one markdown file (indented ones dedented), and what is malformed about its markers."""
    lines = ((ROOT / rel).read_text() if text is None else text).splitlines()
    markers = {n: m.group(1) for n, line in enumerate(lines) if (m := MARKER.match(line))}
    blocks, problems, used, i = [], [], set(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if j == len(lines):
            problems.append(f"{rel}:{i + 1}: code fence never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip = None
        if k in markers:
            used.add(k)
            s = SKIP_MARKER.match(markers[k])
            if s:
                skip = s.group(1).strip()
            else:
                problems.append(
                    f"{rel}:{k + 1}: a marker reads `<!-- docs-test: skip (reason) -->`, got {markers[k]!r}"
                )
        blocks.append(Block(rel, i + 2, lang.lower(), "\n".join(body) + "\n", skip))
        i = j + 1
    problems += [f"{rel}:{k + 1}: docs-test marker not on the line before a code fence" for k in set(markers) - used]
    return blocks, problems


_PARSED = [code_blocks(rel) for rel in DOC_FILES]
BLOCKS = [b for blocks, _ in _PARSED for b in blocks]
MARKUP_PROBLEMS = [p for _, problems in _PARSED for p in problems]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]

# What the README's comments say about the variables its blocks leave behind.
README_CLAIMS = {
    "switches": lambda s: s["y"].shape == (8, 16, 16, 16) and s["switches"].dtype == torch.uint8,
    "x_hat": lambda s: s["x_hat"].shape == s["x"].shape,
    "fused": lambda s: "8 fused, 0 refused" in str(s["fused"].fuse_report),
    "saliency": lambda s: s["saliency"].shape == (1, 64, 64) and s["saliency"].max() > 0,
}


def test_doc_blocks_found():
    assert not MARKUP_PROBLEMS, "\n".join(MARKUP_PROBLEMS)
    unknown = [f"{b}: ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, "code blocks in a language this test neither runs nor checks:\n" + "\n".join(unknown)
    assert len(PYTHON_BLOCKS) >= 2 and len(SHELL_COMMANDS) >= 20, (len(PYTHON_BLOCKS), len(SHELL_COMMANDS))
    readme = "".join(b.text for b in PYTHON_BLOCKS if b.path == "README.md")
    assert all(re.search(rf"\b{name}\b", readme) for name in README_CLAIMS), "a README claim checks nothing"


def test_code_blocks_and_markers():
    text = (
        "<!-- docs-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n- item\n\n  ```bash\n"
        "  drmm --help   # a comment\n  make \\\n    demo\n  ```\n<!-- docs-test: run -->\n\n```\ntext\n```\n"
    )
    blocks, problems = code_blocks("x.md", text)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (3, "python", "needs a GPU"),
        (9, "bash", None),
        (16, "", None),
    ]
    assert [c.argv for c in shell_commands(blocks[1])] == [("drmm", "--help"), ("make", "demo")]
    assert problems == ["x.md:13: a marker reads `<!-- docs-test: skip (reason) -->`, got ' run '"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_block(block):
    """Each python block runs alone: a block that needs a name from the one above it fails."""
    code = compile("\n" * (block.line - 1) + block.text, block.path, "exec")  # tracebacks give the doc's lines
    if block.skip:
        pytest.skip(f"{block}: not run ({block.skip})")
    scope = {"__name__": "__main__"}
    exec(code, scope)
    if block.path == "README.md":
        for name, claim in README_CLAIMS.items():
            if name in scope:
                assert claim(scope), f"{block}: the README's claim about `{name}` does not hold"


@dataclasses.dataclass(frozen=True)
class Command:
    block: Block
    line: int
    argv: Tuple[str, ...]  # as the shell splits it, comments dropped

    def __str__(self) -> str:
        return f"{self.block.path}:{self.line}"

    @property
    def text(self) -> str:
        return " ".join(shlex.quote(a) for a in self.argv)

    @property
    def words(self) -> List[str]:
        """argv with `.venv/bin/` dropped from the program and python3 read as python; `python -m drmm` = drmm."""
        program = self.argv[0].removeprefix(".venv/bin/")
        words = ["python" if program == "python3" else program, *self.argv[1:]]
        return ["drmm", *words[3:]] if words[:3] == ["python", "-m", "drmm"] else words


def shell_commands(block: Block) -> List[Command]:
    """The block's commands: backslash continuations joined, `#` comments dropped, blank lines skipped."""
    lines, commands, n = block.text.splitlines(), [], 0
    while n < len(lines):
        start, text = n, lines[n]
        while text.endswith("\\") and n + 1 < len(lines):
            n += 1
            text = text[:-1] + " " + lines[n]
        n += 1
        argv = shlex.split(text, comments=True)
        if argv:
            commands.append(Command(block, block.line + start, tuple(argv)))
    return commands


SHELL_COMMANDS = [c for b in BLOCKS if b.lang == "bash" for c in shell_commands(b)]

# Commands the test checks but does not run, by the words they start with, and why.
NOT_RUN = {
    "make test": "builds the environment and runs the whole test suite",
    "make demo": "trains for about 7 minutes",
    "make bench": "times every kernel, minutes",
    "drmm experiment table1": "trains each seed for 20 minutes or more",
    "drmm experiment convergence": "trains until 1.5 % test error, minutes per trainer",
    "drmm experiment throughput": "times the training steps, about a minute",
    "drmm experiment report": "rewrites results/table1.md and results/table1_curves.png",
    "python bench/cpu_ops.py": "times every op, minutes",
    "python -m pytest bench/suite": "runs the benchmark suite, a minute or more",
    "python -m pip install": "rebuilds and reinstalls the package",
    "export": "sets the shell's environment for the commands after it",
    "bash experiments/gpu_headline.sh": "needs a GPU",
}
RUN_DRMM = ("train", "eval", "render", "sample")
TRAIN_OVERRIDES = ("max_steps=2", "batch_size=20", "progress=false", "tensorboard=false")
TEST_IMAGES = 100
REPO_TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"runs", "data", "build", "dist"}
OUTPUT_OPTIONS = {"--out", "--out-dir", "--run-dir", "--benchmark-json", "BENCH_JSON"}  # a path that may not exist


def how(command: Command) -> Tuple[str, Optional[str]]:
    """("run", None), or ("check", why it is not run; None when nobody said)."""
    words = command.words
    if command.block.skip:
        return "check", command.block.skip
    if words[0] == "drmm" and ("-h" in words or "--help" in words or words[1:2] in ([w] for w in RUN_DRMM)):
        return "run", None
    if words[:2] in (["pytest-benchmark", "compare"], ["pytest-benchmark", "list"]):
        return "run", None
    keys = [k for k in NOT_RUN if words[: len(k.split())] == k.split()]
    return "check", NOT_RUN[max(keys, key=len)] if keys else None


def _flag(word: str) -> Optional[str]:
    return word.split("=", 1)[0] if word.startswith("-") and word != "-" else None


@functools.lru_cache(maxsize=None)
def _help_text(*argv: str) -> str:
    return subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60).stdout


def _in_text(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def check_problems(command: Command, pytestconfig) -> List[str]:
    """What is wrong with a command that is not run: options it does not have, files that do not exist."""
    words, problems = command.words, []
    flags = [f for f in map(_flag, words[1:]) if f]
    if words[0] == "drmm":
        from drmm.cli import build_parser

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(words[1:])
        except SystemExit as e:
            if e.code not in (0, None):
                problems.append(err.getvalue().strip())
        if words[1:2] == ["train"] and not problems:  # the config file and its --set keys
            from drmm.config import load_config
            from drmm.errors import UsageError

            args = build_parser().parse_args(words[1:])
            try:
                load_config(args.config, args.set or [])
            except UsageError as e:
                problems.append(str(e))
    elif words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        targets = {t for line in re.findall(r"^([\w. -]+):(?!=)", makefile, flags=re.M) for t in line.split()}
        for word in words[1:]:
            if "=" in word:
                var = word.split("=", 1)[0]
                if f"$({var})" not in makefile:
                    problems.append(f"the Makefile does not use {var}")
            elif not word.startswith("-") and word not in targets:
                problems.append(f"the Makefile has no target {word}")
    elif words[:3] == ["python", "-m", "pytest"]:
        conftests = "".join(
            (ROOT / w / "conftest.py").read_text()
            for w in words[3:]
            if not w.startswith("-") and (ROOT / w / "conftest.py").is_file()
        )
        for flag in flags:
            try:
                pytestconfig.getoption(flag)
            except ValueError:
                if not re.search(rf"[\"']{re.escape(flag)}[\"']", conftests):
                    problems.append(f"pytest has no option {flag}")
    elif words[:3] == ["python", "-m", "pip"]:
        text = _help_text(sys.executable, "-m", "pip", words[3])
        problems += [f"pip {words[3]} has no option {f}" for f in flags if not _in_text(f, text)]
    elif words[0] == "pytest-benchmark":
        text = _help_text(str(pathlib.Path(sys.executable).parent / "pytest-benchmark"), *words[1:2])
        problems += [f"pytest-benchmark {words[1]} has no option {f}" for f in flags if not _in_text(f, text)]
    elif words[0] in ("python", "bash") and len(words) > 1 and not words[1].startswith("-"):
        script = ROOT / words[1]
        if not script.is_file():
            problems.append(f"no script {words[1]}")
        else:  # the script's own options: each flag appears in its source
            source = script.read_text()
            problems += [f"{words[1]} has no option {f}" for f in flags if not _in_text(f, source)]
    elif words[0] != "export":
        problems.append(f"tests/test_docs.py does not know how to check `{words[0]}`")
    # repository paths
    prev = ""
    for word in words[1:]:
        key, value = word.split("=", 1) if "=" in word else (prev, word)
        prev = word
        if "/" in value and value.split("/")[0] in REPO_TOP and re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", value):
            path = ROOT / value
            if not (path.parent.is_dir() if key in OUTPUT_OPTIONS else path.exists()):
                problems.append(f"no {'folder for ' if key in OUTPUT_OPTIONS else ''}{value} in the repository")
    return problems


_DATASETS: Dict[Tuple[str, str], object] = {}


def _cut_test_set(load_dataset):
    """drmm.data.load_dataset with the test set cut to its first TEST_IMAGES images (each data set read once)."""

    def load(name, data_dir=None, download_missing=False):
        from drmm.data import data_root

        key = (name, str(data_root(data_dir)))
        if key not in _DATASETS:
            _DATASETS[key] = load_dataset(name, data_dir, download_missing=False)
        data = _DATASETS[key]
        return dataclasses.replace(
            data, test_images=data.test_images[:TEST_IMAGES], test_labels=data.test_labels[:TEST_IMAGES]
        )

    return load


_WORKDIRS: Dict[Block, pathlib.Path] = {}


def workdir(block: Block, tmp_path_factory) -> pathlib.Path:
    """The block's working folder, shared by its commands (in order: a run trained above is there for eval)."""
    if block not in _WORKDIRS:
        wd = tmp_path_factory.mktemp(re.sub(r"\W", "_", str(block)))
        for name in REPO_TOP - {"tests"}:  # folders only: without pyproject.toml, pytest-benchmark loads no conftest
            if (ROOT / name).is_dir():
                (wd / name).symlink_to(ROOT / name)
        _WORKDIRS[block] = wd
    return _WORKDIRS[block]


def _benchmark_json(path: pathlib.Path) -> None:
    """A pytest-benchmark JSON file with one benchmark."""
    stats = dict(
        min=1e-3,
        max=2e-3,
        mean=1.5e-3,
        stddev=1e-4,
        rounds=3,
        median=1.5e-3,
        iqr=2e-4,
        q1=1.4e-3,
        q3=1.6e-3,
        iqr_outliers=0,
        stddev_outliers=0,
        outliers="0;0",
        ld15iqr=1e-3,
        hd15iqr=2e-3,
        ops=666.7,
        total=4.5e-3,
        iterations=1,
    )
    bench = {
        "group": "docs",
        "name": "test_docs",
        "fullname": "docs.py::test_docs",
        "params": None,
        "param": None,
        "extra_info": {},
        "options": {},
        "stats": stats,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "machine_info": {"node": "docs", "cpu": {}},
                "commit_info": {},
                "benchmarks": [bench],
                "datetime": "2000-01-01T00:00:00",
                "version": "5.0.0",
            }
        )
    )


def run_pytest_benchmark(command: Command, wd: pathlib.Path) -> None:
    args = command.words[1:]
    for i, arg in enumerate(args):
        if args[0] == "compare" and arg.endswith(".json"):
            name = f"{i}-{pathlib.Path(arg).name}"  # small files, the doc's paths' form kept (relative or absolute)
            args[i] = str(wd / "abs" / name) if pathlib.Path(arg).is_absolute() else f"json/{name}"
            _benchmark_json(wd / args[i])
    exe = pathlib.Path(sys.executable).parent / "pytest-benchmark"
    r = subprocess.run([str(exe), *args], cwd=wd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{command}: `{command.text}` failed:\n{r.stdout}\n{r.stderr}"


_TRAINED: Dict[Block, List[str]] = {}  # the runs each block's `drmm train` commands made, oldest first


def _has_mnist() -> bool:
    from drmm.data import data_root

    return (data_root(None) / "mnist").is_dir()


def run_drmm(command: Command, wd: pathlib.Path, monkeypatch) -> None:
    """The command in this process, in the block's folder, on MNIST with the test set cut to TEST_IMAGES images."""
    import drmm.data as data_lib
    from drmm.cli import main

    args = command.words[1:]
    trained = _TRAINED.setdefault(command.block, [])
    for i, arg in enumerate(args):
        if re.search(r"<[^>]*>", arg):  # runs/<name>: the run the block trained last
            assert arg.startswith("runs/") and trained, f"{command}: no run for {arg}: the block trains none above it"
            args[i] = trained[-1]
    before = set(os.listdir(wd / "runs")) if (wd / "runs").is_dir() else set()
    if args[:1] == ["train"]:
        args += [a for o in TRAIN_OVERRIDES for a in ("--set", o)]
    # the command runs in its own folder: a relative DRMM_DATA_DIR (CI passes ../shared/data) must not move with it
    monkeypatch.setenv("DRMM_DATA_DIR", str(data_lib.data_root(None).resolve()))
    monkeypatch.chdir(wd)
    monkeypatch.setattr(data_lib, "load_dataset", _cut_test_set(data_lib.load_dataset))
    try:
        if command.argv[1:3] == ("-m", "drmm"):  # python -m drmm: through drmm/__main__.py
            monkeypatch.setattr(sys, "argv", ["drmm", *args])
            runpy.run_module("drmm", run_name="__main__")
            status = 0
        else:
            status = main(args)
    except SystemExit as e:
        status = e.code
    assert status in (0, None), f"{command}: `{command.text}` exited with {status}"
    if (wd / "runs").is_dir():
        trained += [f"runs/{name}" for name in sorted(set(os.listdir(wd / "runs")) - before)]


@pytest.mark.parametrize("command", SHELL_COMMANDS, ids=str)
def test_shell_command(command, pytestconfig, tmp_path_factory, monkeypatch):
    action, reason = how(command)
    words = command.words
    if action == "run" and words[0] == "drmm" and not ("-h" in words or "--help" in words) and not _has_mnist():
        action, reason = "check", "needs MNIST: DRMM_DATA_DIR with mnist/"
    if action == "check":
        assert reason, (
            f"{command}: `{command.text}` is neither run nor said why not: add the words it starts with "
            f"to NOT_RUN in tests/test_docs.py, or mark its block"
        )
        problems = check_problems(command, pytestconfig)
        assert not problems, f"{command}: `{command.text}`:\n" + "\n".join(problems)
        pytest.skip(f"{command}: checked, not run ({reason})")
    wd = workdir(command.block, tmp_path_factory)
    if words[0] == "drmm":
        run_drmm(command, wd, monkeypatch)
    else:
        run_pytest_benchmark(command, wd)


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
MODEL_SECTIONS = (
    "the-generative-model",
    "bottom-up-inference",
    "switches",
    "top-down-rendering",
    "class-templates",
    "nrm-flavour",
    "loss-terms",
    "total-loss-and-batch-composition",
    "loss-weights",
    "eg-training",
    "hard-em",
    "architectures-and-protocol",
    "nrm-architectures",
    "reported-results",
    "variants",
    "sampling-and-generation",
    "implementation-pitfalls",
    "paper-vs-code",
    "evaluation-protocol",
)
KERNEL_SECTIONS = (
    "code-layout",
    "roofline",
    "triton-interpreter",
    "building-the-cuda-extension",
    "benchmarking",
    "pitfalls",
)


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
