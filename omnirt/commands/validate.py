"""`omnirt validate`: check a request (file and/or flags) against the registry and show it resolved."""

from __future__ import annotations

import json
import sys
from typing import Any

from omnirt.commands.generate import (
    add_request_flags,
    build_request,
    print_problems,
    problems_of,
    request_body,
)


def register(sub):
    p = sub.add_parser(
        "validate",
        help="check a request and print it with defaults and preset applied",
        description="Validate a request (a YAML/JSON file, flags, or both; flags win). "
        "Exit 0 and print the resolved request, or exit 2 listing every problem.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="request file (YAML or JSON)")
    add_request_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=run)


def _shorten_image(body: dict[str, Any]) -> dict[str, Any]:
    image = body.get("inputs", {}).get("image")
    if isinstance(image, str) and len(image) > 64:
        body["inputs"]["image"] = f"<{len(image)} characters of base64>"
    return body


def run(args) -> int:
    from omnirt.contract import ContractError

    body = request_body(args, args.file)
    try:
        _, resolved = build_request(body)
    except ContractError as exc:
        problems = problems_of(exc)
        if args.json:
            print(json.dumps({"ok": False, "errors": problems}, indent=2))
        else:
            print_problems(problems)
        return 2
    dumped = resolved.model_dump(mode="json")
    if args.json:
        print(json.dumps({"ok": True, "request": dumped}, indent=2))
    else:
        print(json.dumps(_shorten_image(dumped), indent=2))
        print("ok: the request is valid", file=sys.stderr)
    return 0
