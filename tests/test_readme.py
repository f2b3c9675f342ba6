"""The README's Python examples run as written, each on its own; its test command is the one CI runs; the quickstart
notebook is valid nbformat 4.5 and runs."""

import json
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


def test_quickstart_notebook_is_valid_nbformat_4_5():
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    assert (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5)
    ids = [cell.get("id") for cell in notebook["cells"]]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i) for i in ids), ids  # 4.5's schema
    assert len(set(ids)) == len(ids), ids
    try:
        import nbformat
    except ImportError:  # not a dependency; the checks above are the part of its schema that 4.5 added
        return
    nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


def test_quickstart_notebook_runs():
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert len(namespace["tokens"]) == 16
