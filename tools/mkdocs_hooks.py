"""MkDocs hooks (``mkdocs.yml``: ``hooks:``): the repository's front pages as pages of the site.

``README.md`` becomes the site's home page (``index.md``) and ``BENCHMARKS.md`` its
``benchmarks.md``, so each is written once, where a reader of the repository finds it. Links
are written for the repository (the README links ``docs/sidecar.md``, a page under ``docs/``
links ``../BENCHMARKS.md``); on the site each is rewritten to the page it names. A link to
anything else outside ``docs/`` is left as it is, so ``mkdocs build --strict`` fails on it:
the site has no such page.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# repository path -> its page on the site
ROOT_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md"}
_SOURCE = {page: repo for repo, page in ROOT_PAGES.items()}
# the target of an inline link or image: ](target) or ](target "title")
_LINK = re.compile(r"(\]\()([^)\s]+)")
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)", re.IGNORECASE)


def on_files(files: Files, config: MkDocsConfig, **_: Any) -> Files:
    root = Path(config.config_file_path).parent
    for repo_path, page in ROOT_PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(root / repo_path)))
    return files


def site_target(page_uri: str, target: str) -> str:
    """A link written for the repository, as the page at ``page_uri`` must write it on the site."""
    if _EXTERNAL.match(target):
        return target
    path, hash_, anchor = target.partition("#")
    source = _SOURCE.get(page_uri, posixpath.join("docs", page_uri))
    repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    if repo_path in ROOT_PAGES:
        site_path = ROOT_PAGES[repo_path]
    elif repo_path.startswith("docs/"):
        site_path = repo_path.removeprefix("docs/")
    else:
        return target
    return posixpath.relpath(site_path, posixpath.dirname(page_uri) or ".") + hash_ + anchor


def on_page_markdown(markdown: str, page: Page, **_: Any) -> str:
    uri = page.file.src_uri
    return _LINK.sub(lambda m: m.group(1) + site_target(uri, m.group(2)), markdown)
