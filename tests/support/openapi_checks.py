"""The schemathesis checks that say an answer keeps the OpenAPI document's promise (a documented
status, never a 5xx, the documented content type, headers and body schema), shared by the
in-process gateway test and the fuzzing of a real ``serve``."""

from __future__ import annotations

from schemathesis import checks

CONFORMANCE_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
