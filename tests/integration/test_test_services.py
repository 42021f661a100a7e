"""The test suite's own door: with PostgreSQL up but the database missing, the tests say what to
create or which variable to set, instead of erroring in the first query."""

from __future__ import annotations

import uuid

from tests.support.services import POSTGRES_URL, postgres_problem, require_service


def test_a_missing_test_database_names_createdb_and_the_variable() -> None:
    require_service("postgres")
    name = f"opspawn_missing_{uuid.uuid4().hex[:8]}"
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    assert postgres_problem(url) == (
        f"PostgreSQL answers, but it has no database {name!r}: create it (`createdb {name}`, as a "
        "role that may) or point OPSPAWN_TEST_POSTGRES_URL at one that exists "
        "(postgresql+asyncpg://USER@HOST:PORT/DB)"
    )
    assert postgres_problem(POSTGRES_URL) is None
