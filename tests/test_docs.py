"""The README's code runs, its commands are the ones CI uses, and the examples run."""

import re
import runpy
from pathlib import Path

import numpy as np

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
    assert "dL/dlog_var" in capsys.readouterr().out


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first, second = (b.strip() for b in _blocks("bash")[:2])
    assert first.endswith("kronlik fit --plot fit.png")
    assert second.endswith("python -m pytest -q")
    assert README.index(first) < README.index("## What it computes")
    assert second in (ROOT / ".ci" / "run").read_text()


def _run_example(name, *args):
    return runpy.run_path(str(ROOT / "examples" / name))["main"](*args)


def test_gradient_check_example():
    results = _run_example("gradient_check.py")
    assert results["kronlik.loglik"] < 1e-12 and results["check_gradients passed"] == 1.0
    # what jax.grad through eigh does at repeated eigenvalues is JAX's business: not asserted
    assert "naive eigh + jax.grad" in results


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
