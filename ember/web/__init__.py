"""The browser pages of `ember serve`: a playground (`GET /`) and a live dashboard
(`GET /dashboard`). Plain static HTML/CSS/JS shipped in the package: no CDN, no build step."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Where the pages and their assets live (served under /static/)."""
