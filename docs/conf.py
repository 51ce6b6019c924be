"""Sphinx configuration: `make docs` builds docs/_build/html with warnings as errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# Published weights are never fetched while building (pvt.hub only reads its table anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pvt  # noqa: E402

project = "pvt-vision"
author = "pvt-vision contributors"
copyright = "pvt-vision contributors; PVT by Wang et al., Apache-2.0"
release = pvt.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "pvt_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = True
# The public names are re-exported from the subpackages (pvt.create_model is pvt.models.create_model),
# so an unqualified type name in a signature can match two documented objects.
suppress_warnings = ["ref.python"]

html_theme = "furo"
html_title = f"pvt-vision {release}"
pygments_style = "sphinx"
# Options and flags (`--set`, `--allow-nonfinite`) keep their two hyphens.
smartquotes = False
