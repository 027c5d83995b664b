"""Load MathJax on every page, not only on pages with equations of their own: the sidebar shows
page titles with math (e.g. "heads $g$, $q$ and attention $S_c$") on every page."""


def setup(app):
    app.set_html_assets_policy("always")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
