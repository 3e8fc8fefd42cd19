"""Generate docs/schemas/, the JSON Schemas of the contracts an app outside nasx reads: a bundle's manifest.json
and the answer of POST /explain, built from the pydantic models of ``nasxserve.contracts`` that nasx itself
writes and reads them with. An app that embeds the ONNX model can check a bundle with any JSON Schema validator
(draft 2020-12), without nasx's Python.

    python docs/gen_schemas.py           # rewrite docs/schemas/*.schema.json
    python docs/gen_schemas.py --check   # exit 1 if a file differs from what the models describe

tests/test_contracts.py fails when a model changed and its schema was not regenerated.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                      # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from nasxserve.contracts import ExplainResponse, Manifest  # noqa: E402

SCHEMA_DIR = REPO / "docs" / "schemas"
REGENERATE = "python docs/gen_schemas.py"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# file name -> (model, mode): a file read is described as a reader validates it, an answer as it is written
SCHEMAS: dict[str, tuple[Any, str]] = {
    "manifest.schema.json": (Manifest, "validation"),
    "explain.schema.json": (ExplainResponse, "serialization"),
}


def schema(name: str) -> dict[str, Any]:
    model, mode = SCHEMAS[name]
    return {"$schema": DRAFT, **model.model_json_schema(by_alias=True, mode=mode)}


def render(name: str) -> str:
    """The text of ``docs/schemas/NAME``."""
    return json.dumps(schema(name), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        stale = [name for name in SCHEMAS
                 if not (SCHEMA_DIR / name).is_file() or (SCHEMA_DIR / name).read_text(encoding="utf-8") != render(name)]
        for name in stale:
            print(f"docs/schemas/{name} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1 if stale else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name in SCHEMAS:
        (SCHEMA_DIR / name).write_text(render(name), encoding="utf-8")
        print(f"wrote docs/schemas/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
