"""Sphinx extension: small fixes to the built pages.

* Chapter titles with math appear in the navigation of every page, so MathJax must load on every
  page, not only on pages whose body has math (Sphinx's default).

* Jupyter Book 1.0 with sphinx-thebe 0.3 registers thebe's inline configuration twice, and the
  second ``const THEBE_JS_URL`` declaration is an error in every browser. Identical script entries
  are redundant by definition, so we keep the first of each.
* sphinx-book-theme leaves the pydata theme's ``default_mode`` empty, which the theme's script
  reports as "invalid theme mode" on a first visit. We set it to ``auto`` (its own fallback).
* ``_static/pba.css`` hides the pydata theme's header bar on wide screens, where it only repeats
  the sidebar's search box (see the file).
"""

from __future__ import annotations


def _fix_page(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files") or []
    seen, unique = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        # An inline script appears once with filename None and once with "": the same script.
        key = (getattr(script, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def setup(app):
    app.set_html_assets_policy("always")
    app.add_css_file("pba.css")
    app.connect("html-page-context", _fix_page, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
