"""The README's Python tour runs as written (the README promises examples that work)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_tour():
    assert python_blocks(), "README.md lost its ```python example block"


def test_readme_python_tour_runs(capsys):
    namespace: dict = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert out.strip(), "the tour prints its results"
    assert "out" in namespace and "cache" in namespace  # it reached the last lines
