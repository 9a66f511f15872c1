"""The README's code runs, its commands are the ones CI uses, and the examples run."""

import re
import runpy
from pathlib import Path

import numpy as np

import kronlik

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _blocks("python")
    assert blocks
    namespace = {}  # later blocks continue the first, as a reader would run them
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "dL/dlog_var" in out and "valid (float64)" in out


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first, second = (b.strip() for b in _blocks("bash")[:2])
    assert first.endswith("kronlik fit --plot fit.png")
    assert second.endswith("python -m pytest -q -n 2")
    assert README.index(first) < README.index("## What it computes")
    assert second in (ROOT / ".ci" / "run").read_text()


def _run_example(name, *args):
    return runpy.run_path(str(ROOT / "examples" / name))["main"](*args)


def test_gradient_check_example():
    results = _run_example("gradient_check.py")
    assert results["kronlik.loglik"] < 1e-12 and results["check_gradients passed"] == 1.0
    # the README's claim: jax.grad through eigh is NaN (or wrong) at repeated eigenvalues
    naive = results["naive eigh + jax.grad"]
    assert np.isnan(naive) or naive > 1e-3


def test_fit_log_variances_example():
    truth, fitted, se = _run_example("fit_log_variances.py", 150, 3)
    assert np.all(np.abs(fitted - truth) < 5 * se + 0.1)


def test_multioutput_gp_example(tmp_path):
    result = _run_example("multioutput_gp.py", str(tmp_path / "gp.png"), 60)
    assert result["converged"] and (tmp_path / "gp.png").stat().st_size > 10_000
    assert result["loglik_after"] > result["loglik_before"]


def test_notebooks_execute():
    import nbclient
    import nbformat

    for name in ("derivation.ipynb", "fitting.ipynb"):
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()


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


def test_every_file_and_name_the_readme_mentions_exists():
    import importlib

    paths = set(re.findall(r"`((?:kronlik|benchmarks|examples|tests|notebooks|\.ci)/[\w./-]+)`", README))
    assert len(paths) > 10
    for path in paths:
        assert (ROOT / path).exists(), path
    prose = re.sub(r"```.*?```", "", README, flags=re.S)  # inline code only, fenced blocks run elsewhere
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
        assert field in README and field in kronlik.Validation.__dataclass_fields__
    for module in ("benchmarks.accuracy", "benchmarks.float32_accuracy", "benchmarks.run"):
        assert f"python -m {module}" in README and (ROOT / (module.replace(".", "/") + ".py")).exists()


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
