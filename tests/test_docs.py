"""The README's and the documentation's code runs, the files and names they mention exist, its
commands are the ones CI uses, the site lists every page and public name, and the examples run.

The notebooks are executed by the documentation build (`mkdocs build --strict`, mkdocs-jupyter with
``execute: true, allow_errors: false``): a notebook that fails fails that build, so no test here
executes them. The build also runs every example with small arguments (docs/hooks.py).
"""

import re
import runpy
from pathlib import Path

import numpy as np
import pytest

import kronlik

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PAGES = {"README.md": README} | {
    str(p.relative_to(ROOT)): p.read_text() for p in sorted(DOCS.rglob("*.md"))
}  # README first, then docs/*.md and docs/api/*.md
ALL_TEXT = "\n".join(PAGES.values())

# What each page's Python blocks must print (pages with Python blocks and no entry here fail).
EXPECTED_OUTPUT = {
    "README.md": ["dL/dlog_var", "valid (float64)"],
    "docs/index.md": ["dL/dlog_var", "valid (float64)"],
    "docs/model.md": ["L = ", "predictive mean (5, 4)", "K is not positive semi-definite"],
    "docs/derivatives.md": ["[["],
    "docs/accuracy.md": ["eigh_dtype=None: error", "eigh_dtype=float64: error"],
    "docs/fitting.md": ["["],
    "docs/missing.md": ["observed entries", "mean at the gap"],
    "docs/mixed.md": ["["],
    "docs/scaling.md": ["T = 20000: L = ", "T = 100000 (state space): L = ", "parallel ones agree to"],
}


def _blocks(language, text=README):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_every_page_with_python_blocks_has_expected_output():
    with_code = {name for name, text in PAGES.items() if _blocks("python", text)}
    assert with_code == set(EXPECTED_OUTPUT)


# pages whose blocks fit models or run large problems: second tier
SLOW_PAGES = {"docs/accuracy.md", "docs/derivatives.md", "docs/fitting.md", "docs/mixed.md", "docs/scaling.md"}


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in sorted(EXPECTED_OUTPUT)]
)
def test_python_blocks_run(page, capsys):
    # each page is independent: its first block is self-contained, later blocks continue it
    namespace = {}
    for code in _blocks("python", PAGES[page]):
        exec(compile(code, page, "exec"), namespace)
    out = capsys.readouterr().out
    for expected in EXPECTED_OUTPUT[page]:
        assert expected in out, (page, expected, out)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first, second = (b.strip() for b in _blocks("bash")[:2])
    assert first.endswith("kronlik fit --plot fit.png")
    assert second.endswith("python -m pytest -q -n 2")
    assert README.index(first) < README.index("## What it computes")
    assert second in (ROOT / ".ci" / "run").read_text()
    # the home page of the site starts with the same two commands
    assert _blocks("bash", PAGES["docs/index.md"])[:2] == _blocks("bash")[:2]


def _run_example(name, *args):
    return runpy.run_path(str(ROOT / "examples" / name))["main"](*args)


@pytest.mark.slow
def test_gradient_check_example():
    results = _run_example("gradient_check.py")
    assert results["kronlik.loglik"] < 1e-12 and results["check_gradients passed"] == 1.0
    # the docs' claim: jax.grad through eigh is NaN (or wrong) at repeated eigenvalues
    naive = results["naive eigh + jax.grad"]
    assert np.isnan(naive) or naive > 1e-3


@pytest.mark.slow
def test_fit_log_variances_example():
    truth, fitted, se = _run_example("fit_log_variances.py", 150, 3)
    assert np.all(np.abs(fitted - truth) < 5 * se + 0.1)


@pytest.mark.slow
def test_multioutput_gp_example(tmp_path):
    result = _run_example("multioutput_gp.py", str(tmp_path / "gp.png"), 60)
    assert result["converged"] and (tmp_path / "gp.png").stat().st_size > 10_000
    assert result["loglik_after"] > result["loglik_before"]


@pytest.mark.slow
def test_heritability_coverage_example_runs():
    # a smoke run (the 500-replicate study is in benchmarks/RESULTS.md): every replicate fitted,
    # coverages and SEs reported for each trait and pair
    results = _run_example("heritability_coverage.py", ["--replicates", "4", "--T", "60", "--D", "2", "--snps", "80"])
    assert results["replicates"] == 4 and results["converged"] > 0
    assert (
        set(results["h2"]) == {"h2_0", "h2_1"}
        and set(results["rg"]) == {"rg_01"}
        and set(results["h2_logit"]) == {"h2_0", "h2_1"}
    )
    assert np.all(np.isfinite(results["draws"]["h2_se"]))


@pytest.mark.slow
def test_sharded_batch_example_on_four_cpu_devices():
    # XLA_FLAGS must be set before JAX starts, hence a fresh process.
    import json
    import os
    import subprocess
    import sys

    code = "import json, runpy; print(json.dumps(runpy.run_path('examples/sharded_batch.py')['main']()))"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["output_devices"] == 4
    assert result["max_abs_diff"] < 1e-10


def test_every_file_and_name_the_docs_mention_exists():
    import importlib

    paths = set(re.findall(r"`((?:kronlik|benchmarks|examples|tests|notebooks|\.ci)/[\w./-]+)`", ALL_TEXT))
    assert len(paths) > 10
    for path in paths:
        assert (ROOT / path).exists(), path
    for link in re.findall(r"\]\((docs/[^)#\s]+)", README):  # README's links into the site's pages
        assert (ROOT / link).exists(), link
    prose = re.sub(r"```.*?```", "", ALL_TEXT, flags=re.S)  # inline code only, fenced blocks run elsewhere
    code = " ".join(re.findall(r"`([^`]+)`", prose))
    names = set(re.findall(r"\bkronlik(?:\.\w+)+", code))
    assert len(names) >= 15
    for name in names:
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], start=1):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[: i + 1]))
        assert obj is not None, name
    for attr in set(re.findall(r"\breference\.(\w+)", code)):
        assert hasattr(kronlik.reference, attr), attr
    for field in ("error_bound", "gradient_error_bound"):
        assert field in ALL_TEXT and field in kronlik.Validation.__dataclass_fields__
    for module in ("benchmarks.accuracy", "benchmarks.float32_accuracy", "benchmarks.run"):
        assert f"python -m {module}" in ALL_TEXT and (ROOT / (module.replace(".", "/") + ".py")).exists()


def test_api_reference_and_navigation_cover_everything():
    import json

    api = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))
    documented = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    assert not [name for name in kronlik.__all__ if f"kronlik.{name}" not in documented]
    for name in ("kronlik.fitting.information_step", "kronlik.fitting.observed_information"):
        assert name in documented
    forms = [n for n in kronlik.forms.__all__ if isinstance(getattr(kronlik.forms, n), type)]
    assert not [n for n in forms if f"kronlik.forms.{n}" not in documented and f"kronlik.{n}" not in documented]

    config = (ROOT / "mkdocs.yml").read_text()
    nav = re.search(r"^nav:\n(.*?)^\S", config, flags=re.M | re.S).group(1)
    listed = re.findall(r"^\s*- (?:[^\n]*?: )?(\S+\.(?:md|ipynb))\s*$", nav, flags=re.M)
    assert len(listed) == len(set(listed))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    notebooks = {str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert len(notebooks) >= 2
    assert set(listed) == pages | notebooks
    for path in notebooks:  # stored without outputs: the docs build executes them
        cells = json.loads((ROOT / path).read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), path
    # every example is run by the docs build and shown on the examples page
    hooks, examples_page = (DOCS / "hooks.py").read_text(), (DOCS / "examples.md").read_text()
    for script in (ROOT / "examples").glob("*.py"):
        assert f'"{script.name}"' in hooks and f"<!-- example: {script.name} -->" in examples_page, script.name


def test_ci_minimum_versions_are_pyprojects_lower_bounds():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d).groups() for d in deps)
    pins = dict(
        line.split("==") for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines() if "==" in line
    )
    assert set(pins) == set(lower)
    for name, version in lower.items():
        assert pins[name].startswith(version.rstrip(".0") or version), (name, pins[name], version)
    assert "min-versions.txt" in (ROOT / ".ci" / "run").read_text()
