"""Sphinx configuration of the API reference site (``sphinx-build -W docs OUT``).

The narrative pages are the Markdown files of ``docs/`` (read with myst-parser);
the reference pages in ``docs/api/`` are built from the package's docstrings
(autodoc with napoleon for the Google-style sections).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # document this checkout

import aggc_optax  # noqa: E402

project = "aggc_optax"
release = version = aggc_optax.__version__
author = "aggc_optax contributors"
copyright = "aggc_optax contributors, Apache-2.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
root_doc = "api/contents"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "data"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "alabaster"
html_title = f"aggc_optax {release}"
