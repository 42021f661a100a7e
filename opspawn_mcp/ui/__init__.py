"""The web dashboard at ``/ui``: server-rendered pages over ``TaskService``, behind the HTTP guard.

Jinja templates and one plain script, shipped in the package: no front-end build step.
See docs/operations.md, "Dashboard".
"""

from opspawn_mcp.ui.routes import dashboard_routes

__all__ = ["dashboard_routes"]
