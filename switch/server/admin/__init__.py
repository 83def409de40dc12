"""Admin HTTP API of merchant services (issue 6): Starlette on trio, served by hypercorn. See app.py."""

from switch.server.admin.app import build_app, serve_admin

__all__ = ["build_app", "serve_admin"]
