"""The committed gRPC code is exactly what scripts/gen_proto.py makes from proto/tasks.proto.

If this fails, someone edited the .proto without regenerating (or edited generated code):
run ``python scripts/gen_proto.py`` and commit the result.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    gen = _generator()
    fresh = gen.generate(tmp_path)  # type: ignore[attr-defined]
    assert fresh, "the generator produced nothing"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing; run python scripts/gen_proto.py"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale; run python scripts/gen_proto.py"
        )
