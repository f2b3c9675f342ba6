"""The README's Python examples run as written, and its test command is the one CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 64, 256)
    assert namespace["next_logits"].shape == (2, 1, 256)
    assert namespace["y_next"].shape == (1, 2, 64)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(python3 -m venv [^\n]*pytest[^\n]*)\n```", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_quickstart_notebook_runs():
    import json

    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert len(namespace["tokens"]) == 16
