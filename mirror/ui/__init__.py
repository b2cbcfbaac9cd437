"""The cache browser: server-side HTML pages under /ui/ that show what the cache holds, to
each visitor only what that visitor may read (`mirror.ui.visitors`). `Browser` builds it
from the app's parts; the app factory adds its routes, its middleware and its task."""

from __future__ import annotations

from mirror.ui.browser import Browser
from mirror.ui.pulls import PullCounter

__all__ = ["Browser", "PullCounter"]
