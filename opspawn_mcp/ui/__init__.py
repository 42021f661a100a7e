"""The web dashboard at ``/ui``: server-rendered pages over ``TaskService``, behind the HTTP guard.

Tasks (status filter, search, live rows), a task's page (its timeline streaming over SSE, tool
calls with arguments and results, usage and timings, cancel and approve/deny), the downstream
servers. Jinja templates and one plain script, shipped in the package: no front-end build step.
Who may see what is the guard's and the service's business, exactly as for REST.
"""

from opspawn_mcp.ui.routes import dashboard_routes

__all__ = ["dashboard_routes"]
