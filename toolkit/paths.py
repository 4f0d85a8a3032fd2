"""Paths in recipes: `pkg://PACKAGE/sub/path` names a file or folder inside an installed Python
package (found through importlib), so shipped recipes never hold one machine's paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from toolkit.errors import ToolkitError

PKG = "pkg://"


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(f"package '{name}' is not installed: pip install it, or point at files on disk")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(spec: str | os.PathLike) -> str:
    """`pkg://PACKAGE/rest` -> the path inside the installed package; `~` expanded; others unchanged."""
    spec = str(spec)
    if spec.startswith(PKG):
        package, _, rest = spec[len(PKG) :].partition("/")
        spec = str(package_root(package) / rest)
    return os.path.expanduser(spec)
