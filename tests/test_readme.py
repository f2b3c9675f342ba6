"""The README's Python examples run as written, each on its own; its test command is the one CI runs (the notebooks
are checked in test_notebooks.py)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    namespaces = []
    for block in blocks:  # each in a fresh namespace: a reader may paste any one of them alone
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        namespaces.append(namespace)
    assert namespaces[0]["logits"].shape == (2, 64, 256)
    assert namespaces[0]["next_logits"].shape == (2, 1, 256)
    assert namespaces[1]["y_next"].shape == (1, 2, 64)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(python3 -m venv [^\n]*pytest[^\n]*)\n```", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()
