"""schemathesis against the running service, through the hub's proxy: no 5xx, every error a
JSON ``{"message", "reason"}``, every answer as the document describes it.

One run per identity: a user, an admin and no token. Each run is bounded (a fixed number of
examples per operation, a fixed seed, no shrinking, a deadline) and its report is read back
to count requests and failures.

The hub is shared with the other tests, so the runs keep its state as it was:

- the user run is a user of its own (``fuzz-user``); what it leaves (placements holding
  resources, uploads, datasets it managed to create) is released and removed afterwards;
- the admin run sends only ``GET`` requests. Admin writes on a shared hub would drain or
  overwrite its only node (``PATCH nodes/NAME``, ``PUT nodes/NAME/heartbeat``), release other
  tests' placements and dataset holds (ids are small integers a fuzzer does hit), collect
  their uploads (``POST dataset-store/gc``), or stop, change and delete their sessions and
  datasets. The user run sends those writes too (as a non-admin: refused, or acting on its
  own objects), and ``test_api_input.py`` covers their parameter and body rules as an admin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hubproc import HubProcess

pytestmark = [pytest.mark.hub, pytest.mark.docker]

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
HOOKS = Path(__file__).with_name("fuzz_hooks.py")
SEED = 20_260_512
EXAMPLES = int(os.environ.get("NSML_FUZZ_EXAMPLES", "40"))
"""Examples per operation in the fuzzing phase (the coverage phase adds its boundary cases)."""
ANONYMOUS_EXAMPLES = max(EXAMPLES // 4, 5)
"""Without a token every request is refused before its parameters or body are read (one code
path whatever was generated), so the anonymous run needs fewer examples to cover it."""
DEADLINE_S = float(os.environ.get("NSML_FUZZ_DEADLINE_S", "240"))
"""Longest one identity's run may take."""

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
]
FUZZ_USER = "fuzz-user"
ARCHIVE_OPERATIONS = [
    "POST /code",
    "PUT /sessions/{user}/{dataset}/{n}/checkpoints/{checkpoint}",
    "POST /datasets/{name}/uploads",
]


def config(tmp: Path, token: str | None, only_get: bool, examples: int = EXAMPLES) -> Path:
    """The run's schemathesis.toml."""
    lines = [
        f"seed = {SEED}",
        "workers = 1",
        "request-timeout = 60",
        f"hooks = {json.dumps(str(HOOKS))}",
        "color = false",
    ]
    if token:
        lines.append(f'headers = {{ Authorization = "token {token}" }}')
    lines += [
        "[generation]",
        f"max-examples = {examples}",
        "no-shrink = true",
        'database = "none"',
        "[phases.stateful]",
        "enabled = false",
        "[checks]",
        "enabled = false",
        *[f"{c}.enabled = true" for c in CHECKS],
        "json_error_body.enabled = true",
        "[reports.json]",
        "enabled = true",
        f"path = {json.dumps(str(tmp / 'report.json'))}",
    ]
    lines += [
        # The body of these is an archive or a manifest: rules that a JSON schema cannot state
        # (a readable tar archive; unique, non-overlapping paths). Fuzzed ones get a 400.
        "[[operations]]",
        f"include-name = {json.dumps(ARCHIVE_OPERATIONS)}",
        "checks.positive_data_acceptance.enabled = false",
    ]
    lines += [
        # A valid ask that no node of the cluster can ever hold is a documented 422; one
        # the caller's credits cannot cover a documented 402.
        "[[operations]]",
        'include-name = "POST /placements"',
        "checks.positive_data_acceptance.expected-statuses = "
        '["2xx", "401", "402", "403", "404", "409", "422"]',
    ]
    lines += [
        # A server-sent-event stream does not end while its client listens; the fuzzer reads
        # every answer to its end. Its refusals are covered by test_api_input and its
        # stream by test_event_stream.
        "[[operations]]",
        'include-name = "GET /events/stream"',
        "enabled = false",
    ]
    if only_get:
        lines += ["[[operations]]", 'include-method = ["POST", "PUT", "PATCH", "DELETE"]']
        lines += ["enabled = false"]
    path = tmp / "schemathesis.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(
    hub: HubProcess, tmp: Path, token: str | None, only_get: bool, examples: int = EXAMPLES
) -> dict[str, Any]:
    cfg = config(tmp, token, only_get, examples)
    start = time.monotonic()
    r = subprocess.run(
        [SCHEMATHESIS, "--config-file", str(cfg), "run", f"{hub.nsml_api}/openapi.json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=DEADLINE_S,
        cwd=tmp,
        env={**os.environ, "NO_COLOR": "1"},
    )
    elapsed = time.monotonic() - start
    (tmp / "output.txt").write_text(r.stdout + r.stderr)
    report_path = tmp / "report.json"
    assert report_path.exists(), f"no report (exit {r.returncode}): see {tmp / 'output.txt'}"
    report = json.loads(report_path.read_text())
    return {
        "exit": r.returncode,
        "output": tmp / "output.txt",
        "seconds": elapsed,
        "report": report,
    }


def summary(identity: str, out: dict[str, Any]) -> str:
    report = out["report"]
    cases = report["test_cases"]
    lines = [
        f"schemathesis as {identity}: {cases['generated']} requests, "
        f"{report['operations']['tested']} operations, {out['seconds']:.0f}s, "
        f"{cases['with_failures']} with failures, exit {out['exit']}"
    ]
    for f in report["failures"]:
        lines.append(f"  {f['code']} {f['title']} x{f['count']}: {', '.join(f['operations'])}")
    for e in report["errors"]:
        lines.append(f"  error: {e['title']} x{e['count']}")
    return "\n".join(lines)


def cleanup_user(hub: HubProcess, token: str) -> None:
    """Release what the user run holds, remove what it made (it is the only user of it)."""
    for p in hub.nsml("GET", "placements", token).json().get("placements", []):
        if p["state"] in ("waiting", "placed"):
            hub.nsml("DELETE", f"placements/{p['id']}", token)
    for d in hub.nsml("GET", "datasets?scope=mine", token).json().get("datasets", []):
        hub.nsml("DELETE", f"datasets/{d['name']}", token)


@pytest.mark.parametrize("identity", ["user", "admin", "anonymous"])
def test_fuzzing_the_api_finds_no_server_error_and_no_answer_outside_the_document(
    hub: HubProcess, tmp_path: Path, identity: str
) -> None:
    token = None
    if identity == "user":
        token = hub.user_token(FUZZ_USER)
    elif identity == "admin":
        token = hub.user_token("admin")
    try:
        out = run_schemathesis(
            hub,
            tmp_path,
            token,
            only_get=identity == "admin",
            examples=EXAMPLES if token else ANONYMOUS_EXAMPLES,
        )
    finally:
        if identity == "user" and token:
            cleanup_user(hub, token)
    text = summary(identity, out)
    print(text)
    report = out["report"]
    assert report["complete"] and report["stop_reason"] == "completed", text
    assert not report["failures"] and not report["errors"], f"{text}\nsee {out['output']}"
    assert report["test_cases"]["generated"] > (500 if token else 200), text
    assert out["exit"] == 0, f"{text}\nsee {out['output']}"
