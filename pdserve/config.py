"""`--config FILE`: option defaults for a role from a YAML file, every key checked."""
from __future__ import annotations

import argparse

ROLE_COMMANDS = ("serve", "router", "prefill", "decode", "both")


def load_config(path: str, role: str, parsers: dict[str, argparse.ArgumentParser]) -> dict:
    """Defaults for `role` from a YAML file: top-level keys apply to every role that has such an
    option, a section named after a role (`router:`, `prefill:`, ...) to that role only. Keys are
    option names (`max_num_seqs` or `max-num-seqs`). A key no role knows is an error naming it."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: the top level must be a mapping of option names to values")

    def dests(name: str) -> set[str]:
        return {a.dest for a in parsers[name]._actions if a.dest not in ("help", "config")}

    def norm(d: dict) -> dict:
        return {str(k).replace("-", "_"): v for k, v in d.items()}

    top = norm({k: v for k, v in doc.items() if k not in ROLE_COMMANDS})
    known_any = set().union(*(dests(r) for r in ROLE_COMMANDS))
    unknown = sorted(set(top) - known_any)
    errors = [f"unknown key(s) at the top level: {', '.join(unknown)}"] if unknown else []
    for r in ROLE_COMMANDS:
        section = doc.get(r) or {}
        if not isinstance(section, dict):
            errors.append(f"section {r!r} must be a mapping")
            continue
        bad = sorted(set(norm(section)) - dests(r))
        if bad:
            errors.append(f"unknown key(s) in section {r!r}: {', '.join(bad)}")
    if errors:
        raise SystemExit(f"{path}: " + "; ".join(errors))
    mine = dests(role)
    values = {k: v for k, v in top.items() if k in mine}
    values.update(norm(doc.get(role) or {}))
    return values
