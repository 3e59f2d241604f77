"""MkDocs hooks (mkdocs.yml `hooks:`): each page's `{{ source:key.path }}` numbers and
`{{ table:name }}` tables rendered from the repository's files (sepen.docs_numbers) as the site
builds; a placeholder whose file or key is missing fails the build."""

from __future__ import annotations

from pathlib import Path

from sepen.docs_numbers import Sources, render

_sources: Sources | None = None


def on_config(config, **kwargs):
    global _sources
    _sources = Sources(Path(config["config_file_path"]).parent)
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    root = Path(config["config_file_path"]).parent
    return render(markdown, root, _sources or Sources(root))
