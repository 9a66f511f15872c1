"""mkdocs hooks: put the notebooks on the site and run the examples at build time.

- The notebooks (every ``notebooks/*.ipynb``, listed in mkdocs.yml's nav; outside ``docs/``, stored
  without outputs) are added to the site's files before mkdocs-jupyter picks its pages, and it
  executes them (``execute: true``, ``allow_errors: false``): a notebook that fails fails the build.
- Each example in ``EXAMPLES`` runs as a subprocess, from the repository root, with small arguments,
  in the background from the start of the build (two at a time), and ``docs/examples.md``'s markers
  ``<!-- example: NAME -->`` become the script's source and its output. A non-zero exit fails the
  build. ``multioutput_gp.py``'s figure is added to the site.
- ``<!-- help: fit -->`` and ``<!-- help: mixed -->`` (in any page) become ``kronlik fit --help``
  and ``kronlik mixed --help``, so the options listed are the command's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
FIGURE = "examples/multioutput_gp.png"  # where the example's figure appears on the site

# name -> (arguments, extra environment); "{tmp}" is a scratch folder for the build
EXAMPLES: dict[str, tuple[list[str], dict[str, str]]] = {
    "gradient_check.py": ([], {}),
    "fit_log_variances.py": (["150", "3"], {}),
    "multioutput_gp.py": (["{tmp}/multioutput_gp.png", "60"], {}),
    "heritability_coverage.py": (["--replicates", "4", "--T", "60", "--D", "2", "--snps", "80"], {}),
    "sharded_batch.py": ([], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
    "stocks_with_gaps.py": (["{tmp}/stocks.csv"], {}),
}
TIMEOUT_S = 600

HELP = ("fit", "mixed")

_pool: ThreadPoolExecutor | None = None
_runs: dict[str, Future] = {}
_tmp: Path | None = None


def _run(argv: list[str], env: dict[str, str]) -> tuple[list[str], str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise PluginError(f"python {' '.join(argv)} exited with {done.returncode}:\n{done.stdout}")
    return argv[1:], done.stdout, time.perf_counter() - start


def on_config(config):
    global _pool, _tmp
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)
    _tmp = Path(tempfile.mkdtemp(prefix="kronlik-docs-"))
    _pool = ThreadPoolExecutor(max_workers=2)
    _runs.clear()
    for command in HELP:  # first: pages early in the build wait for these
        _runs[f"help:{command}"] = _pool.submit(_run, ["-m", "kronlik", command, "--help"], {"COLUMNS": "100"})
    for name, (args, env) in EXAMPLES.items():
        _runs[name] = _pool.submit(_run, [f"examples/{name}", *(a.format(tmp=_tmp) for a in args)], env)
    return config


@event_priority(100)  # before mkdocs-jupyter turns .ipynb files into pages
def on_files(files, config):
    # Pages are read (and the notebooks executed) in this order: the notebooks first, while the
    # examples run in the background, so that examples.md waits as little as possible.
    notebooks = [File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]) for path in NOTEBOOKS]
    files = Files([*notebooks, *files])
    # written by the example while the pages are read, copied when the site is written
    files.append(File.generated(config, FIGURE, abs_src_path=str(_tmp / "multioutput_gp.png")))
    return files


def _section(name: str) -> str:
    args, output, seconds = _runs[name].result()
    shown = " ".join(a.replace(str(_tmp) + "/", "") for a in args)
    source = (ROOT / "examples" / name).read_text().rstrip()
    lines = [
        f"`python examples/{name}{' ' + shown if shown else ''}` ({seconds:.0f} s while this page was built):",
        "",
        "```text",
        output.rstrip(),
        "```",
        "",
        f'??? example "Source: `examples/{name}`"',
        "",
        "    ```python",
        *(("    " + line) if line else "" for line in source.splitlines()),
        "    ```",
    ]
    if name == "multioutput_gp.py":
        lines += ["", f"![posterior of the multi-output GP]({FIGURE})"]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    for command in HELP:
        marker = f"<!-- help: {command} -->"
        if marker in markdown:
            output = _runs[f"help:{command}"].result()[1].rstrip()
            markdown = markdown.replace(marker, f"```text\n$ kronlik {command} --help\n{output}\n```")
    if page.file.src_uri != "examples.md":
        return markdown
    missing = [name for name in EXAMPLES if f"<!-- example: {name} -->" not in markdown]
    if missing:
        raise PluginError(f"docs/examples.md has no marker for {missing}")
    for name in EXAMPLES:
        markdown = markdown.replace(f"<!-- example: {name} -->", _section(name))
    return markdown


def on_post_build(config):
    if _pool is not None:
        _pool.shutdown(wait=True)
