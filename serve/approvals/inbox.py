"""The approvals inbox page (placeholder until the page lands)."""

from __future__ import annotations

__all__ = ["render_inbox"]


def render_inbox() -> str:
    return "<!doctype html><title>Approvals</title>"
