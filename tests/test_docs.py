"""Examples in the README and the docstrings run and say what they claim."""

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["drmm_kernels", "drmm_kernels.ops", "drmm_kernels.layers"]


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
    assert scope["logits"].shape == (8, 10)
    assert scope["x_hat"].shape == scope["x"].shape
