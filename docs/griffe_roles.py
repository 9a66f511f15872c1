"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): Sphinx roles in the docstrings.

kronlik's docstrings write :func:`loglik`, :class:`~kronlik.LowRank`, :mod:`kronlik.forms`.
Markdown has no roles, so before a docstring is parsed each role becomes a cross-reference to the
API reference when its target is documented there (``[`loglik`][kronlik.loglik]``), and plain code
otherwise (a private helper, a module without a page). Documented means: named by a ``::: name``
line of ``docs/api/*.md``, or a public member of a module rendered whole there (kronlik.kernels).
Without this, a role at the start of a ``Returns:`` section would also be read as a ``name:``.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

API = Path(__file__).resolve().parent / "api"
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([\w.]+)`")


def _documented() -> tuple[set[str], tuple[str, ...]]:
    names = set()
    for page in API.glob("*.md"):
        names.update(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    whole = {"kronlik.kernels", "kronlik.reference", "kronlik.datasets"}  # module pages with their members
    modules = tuple(f"{n}." for n in names & whole)
    return names, modules


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.path != "kronlik":
            return
        names, modules = _documented()

        def rendered(path: str) -> bool:  # a public member, with a docstring, of a module rendered whole
            if not path.startswith(modules) or any(part.startswith("_") for part in path.split(".")):
                return False
            try:
                return pkg[path.removeprefix("kronlik.")].docstring is not None
            except (KeyError, ValueError, griffe.AliasResolutionError):
                return False

        def rewrite(obj: griffe.Object) -> None:
            scopes = [obj.parent.path] if obj.parent is not None and obj.parent.is_class else []
            scopes.append(obj.module.path)

            def replace(match: re.Match) -> str:
                name = match.group(1)
                shown = name.rsplit(".", 1)[-1] if "~" in match.group(0) else name
                for target in (name, *(f"{scope}.{name}" for scope in scopes), f"kronlik.{name}"):
                    if target in names or rendered(target):
                        return f"[`{shown}`][{target}]"
                return f"`{shown}`"

            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(replace, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    rewrite(member)

        rewrite(pkg)
