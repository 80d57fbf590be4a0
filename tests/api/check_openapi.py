"""Validates OpenAPI 3.1 documents (the gateway's /openapi.json, docs/openapi.json).

    python check_openapi.py FILE...

Each file is checked with openapi-spec-validator's OpenAPI 3.1 validator
(every error is printed, not only the first), and every local `$ref` must
resolve: the validator follows references lazily and does not report one
that points nowhere. Exits 1 when a document is invalid. Run by
services/eventfold/tests/schemathesis.rs in the virtualenv tests/run
installs from tests/api/requirements.txt.
"""

import json
import sys

from openapi_spec_validator import OpenAPIV31SpecValidator


def local_refs(node, where="#"):
    """Yields (location, reference) for every `$ref` in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from local_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from local_refs(value, f"{where}/{index}")


def resolve(document, reference):
    """The node a `#/a/b` reference names, or None."""
    node = document
    for part in reference[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check(path):
    with open(path, encoding="utf-8") as file:
        document = json.load(file)
    problems = []
    if document.get("openapi", "").split(".")[:2] != ["3", "1"]:
        problems.append(f"openapi is {document.get('openapi')!r}, expected 3.1.x")
    for error in OpenAPIV31SpecValidator(document).iter_errors():
        problems.append(str(error).split("\n", 1)[0])
    for where, reference in local_refs(document):
        if not reference.startswith("#/"):
            problems.append(f"{where}: $ref {reference!r} is not local")
        elif resolve(document, reference) is None:
            problems.append(f"{where}: $ref {reference!r} resolves to nothing")
    operations = sum(
        1
        for item in document.get("paths", {}).values()
        for method in item
        if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace")
    )
    return problems, operations


def main(paths):
    if not paths:
        print("usage: check_openapi.py FILE...", file=sys.stderr)
        return 2
    failed = False
    for path in paths:
        problems, operations = check(path)
        if problems:
            failed = True
            print(f"{path}: INVALID ({len(problems)} problems)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{path}: valid OpenAPI 3.1 ({operations} operations)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
