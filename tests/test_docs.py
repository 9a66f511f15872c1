"""The README's code runs, its commands are the ones CI uses, and the examples run."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "dL/dlog_var" in capsys.readouterr().out


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first, second = (b.strip() for b in _blocks("bash")[:2])
    assert first.endswith("python -m kronlik check")
    assert second.endswith("python -m pytest -q")
    assert README.index(first) < README.index("## What it computes")
    assert second in (ROOT / ".ci" / "run").read_text()


def test_eigh_pitfall_example():
    results = runpy.run_path(str(ROOT / "examples" / "eigh_gradient_pitfall.py"))["main"]()
    assert results["kronlik.loglik"] < 1e-12
    # what jax.grad through eigh does at repeated eigenvalues is JAX's business: not asserted
    assert "naive eigh + jax.grad" in results
