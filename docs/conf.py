"""Sphinx configuration for fdp's documentation.

Build (what CI runs)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

The guides are the Markdown pages in this folder (MyST); the API reference under ``api/`` is
generated from the docstrings (autodoc + napoleon, Google style). ``-n`` makes every unresolved
cross-reference a warning, and ``-W`` makes warnings fail the build. No intersphinx: the build
must not need the network, so references to names outside fdp (torch, typing, hypothesis, ...)
are listed in ``nitpick_ignore_regex`` below; references to ``fdp.*`` names are never ignored.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import the checkout's fdp even when it is not installed

from sphinx.util.docutils import SphinxDirective  # noqa: E402

import fdp  # noqa: E402

# --- project ------------------------------------------------------------------------------------

project = "fdp"
author = "fdp contributors"
copyright = "fdp contributors"
release = fdp.__version__  # the one place the version lives
version = ".".join(release.split(".")[:2])
GITHUB = "https://github.com/fdp-dev/fdp"

# --- general ------------------------------------------------------------------------------------

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = True  # the same as -n

# MyST: pages link to each other's sections as ``page.md#slug`` (GitHub-style slugs).
myst_heading_anchors = 3

# --- autodoc / napoleon -------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show ``dim=0``, not the repr of an evaluated default
autodoc_inherit_docstrings = False  # torch.nn.Module's docstrings are not fdp's
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_attr_annotations = False  # attribute types are in the class signature already

# Names outside fdp that signatures mention. Without intersphinx (the build must not need the
# network) they cannot resolve; they are rendered as plain, unlinked names.
# Do NOT add ``fdp.*`` patterns here: every reference to an fdp name must resolve.
nitpick_ignore_regex = [
    ("py:.*", r"torch\..*"),
    ("py:.*", r"(collections\.abc|typing|contextlib)\..*"),
    ("py:.*", r"hypothesis\..*"),
    ("py:.*", r"(jax|numpy)\..*"),
]
nitpick_ignore = [
    ("py:class", "os.PathLike"),
    ("py:class", "pathlib.Path"),
    ("py:class", "nn.Module"),  # torch.nn.Module, as a signature spells it
    # fdp's private type aliases, shown by name in signatures (``PyTree = Any`` etc.): not
    # public objects, so nothing to link to.
    ("py:class", "PyTree"),
    ("py:class", "Params"),
    ("py:class", "OptState"),
    ("py:class", "Updates"),
    ("py:class", "Tensors"),
]

# Every public name must appear in the API reference: a name added to one of these modules'
# ``__all__`` without a matching entry under docs/api/ is a warning (so it fails the build).
PUBLIC_MODULES = [
    "fdp",
    "fdp.optim",
    "fdp.nn",
    "fdp.random",
    "fdp.tree",
    "fdp.testing",
    "fdp.testing.strategies",
    "fdp.interop",
    "fdp.interop.jax",
    "fdp.launch",
    "fdp.backends",
]


def _public_names(modname):
    import importlib

    return set(getattr(importlib.import_module(modname), "__all__", ()))


def _materialize_lazy_attributes():
    """Some public modules load names lazily (a module ``__getattr__``, PEP 562). autodoc lists
    a module's members with ``dir()``, which does not see them; bind them as attributes."""
    import importlib

    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            if name not in vars(module):
                setattr(module, name, getattr(module, name))


def _skip_member(app, what, name, obj, skip, options):
    # NamedTuple fields are documented by the class's ``Attributes:`` section; autodoc would
    # document them a second time as "Alias for field number N" (a duplicate object).
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


class PublicData(SphinxDirective):
    """``.. fdp-public-data:: fdp.backends``: an ``autodata`` entry for each name in the module's
    ``__all__`` that is not a class, a function or a module (type aliases, constants).

    ``automodule`` with ``:members:`` documents such a name only when the module's own source
    has its docstring; a re-exported ``ReduceOp = Literal[...]`` has it in a private module.
    """

    required_arguments = 1

    def run(self):
        import importlib
        import inspect

        from docutils import nodes
        from docutils.statemachine import StringList
        from sphinx.pycode import ModuleAnalyzer

        modname = self.arguments[0]
        module = importlib.import_module(modname)
        own_docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        lines = StringList()
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
                continue
            if ("", name) in own_docs:
                continue  # automodule :members: documents it
            lines.append(f".. autodata:: {modname}.{name}", "<fdp-public-data>")
            lines.append("", "<fdp-public-data>")
        node = nodes.Element()
        self.state.nested_parse(lines, self.content_offset, node)
        return node.children


def _docstring_of_reexported_data(app, what, name, obj, options, lines):
    """A type alias re-exported by a public module (``fdp.backends.ReduceOp``) has its docstring
    (the string under the assignment) in the private module that defines it: use that one."""
    if what != "data" or any(line.strip() for line in lines):
        return
    from sphinx.pycode import ModuleAnalyzer, PycodeError

    short = name.rpartition(".")[2]
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("fdp.") or vars(module).get(short, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", short) in docs:
            lines[:] = list(docs[("", short)])
            return


def _check_public_api_documented(app, env):
    """Every name in a public module's ``__all__`` is documented, and nothing else is documented
    directly under a public module (a stale hand-written entry)."""
    import importlib
    import inspect

    from sphinx.util import logging

    logger = logging.getLogger("fdp.docs")
    objects = env.get_domain("py").objects
    documented = {name for name, entry in objects.items() if not entry.aliased}
    for modname in PUBLIC_MODULES:
        if modname not in documented:
            logger.warning("API reference: module %s is not documented under docs/api/", modname)
        module = importlib.import_module(modname)
        public = _public_names(modname)
        for name in sorted(public):
            if inspect.ismodule(getattr(module, name, None)):
                continue  # a submodule: checked as a module above
            if f"{modname}.{name}" not in documented:
                logger.warning("API reference: %s is public (in %s.__all__) but not documented "
                               "under docs/api/", f"{modname}.{name}", modname)
        for full in sorted(documented):
            parent, _, name = full.rpartition(".")
            if parent == modname and full not in PUBLIC_MODULES and name not in public:
                logger.warning("API reference: %s is documented but not in %s.__all__",
                               full, modname)


def setup(app):
    _materialize_lazy_attributes()
    app.add_directive("fdp-public-data", PublicData)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-docstring", _docstring_of_reexported_data)
    app.connect("env-check-consistency", _check_public_api_documented)


# --- HTML ---------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"fdp {release}"
html_theme_options = {
    "source_repository": GITHUB,
    "source_branch": "main",
    "source_directory": "docs/",
}
