"""`--kv-offer early|late` with real processes: the prefill worker offers a request's KV when its
last prompt chunk is scheduled (early) or after its prefill (late); either way the greedy text
equals transformers', a request ended by its first token leaves nothing held, and no transfer
fails. The workers' debug logs show which path each hand-off took."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.serving.conftest import start_serve, stop
from tests.serving.test_modes import PROMPTS, _check_outputs


def _settled(url: str) -> dict:
    """/health once every worker has freed every block and has no transfer in flight."""
    deadline = time.monotonic() + 30
    while True:
        h = httpx.get(url + "/health").json()
        ws = h["workers"]
        if len(ws) == 2 and all(w["free_blocks"] == w["total_blocks"] and w["transfers"] == 0 for w in ws):
            return h
        assert time.monotonic() < deadline, ws
        time.sleep(0.1)


@pytest.mark.parametrize("offer", ["early", "late"])
def test_kv_offer_early_and_late(demo_model, reference, tmp_path, offer):
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        # A 16-token step budget: most prompts take several chunks, the offer comes with the last.
        s = start_serve(demo_model, "--kv-offer", offer, "--max-num-batched-tokens", "16",
                        "--heartbeat-interval", "0.2", "--log-level", "DEBUG", stderr=err)
    try:
        # The first hand-off to a decode worker is offered late in either mode: its KV handshake
        # happens after the step, not inside it.
        warm = httpx.post(s.url + "/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 2},
                          timeout=60)
        assert warm.status_code == 200
        _check_outputs(s.url, reference)
        r = httpx.post(s.url + "/v1/completions", json={"model": "demo", "prompt": PROMPTS[6], "max_tokens": 1,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        _settled(s.url)
        metrics = httpx.get(s.url + "/metrics").text
        failures = re.findall(r"^pdserve:kv_transfer_failures_total\{[^}]*\} (\S+)$", metrics, re.M)
        assert failures and all(float(v) == 0 for v in failures), failures
    finally:
        stop(s.procs)
    text = log.read_text(errors="replace")
    early = text.count("offered to decode-0 while its last chunk is computed")
    late = text.count("first token sent, KV")
    if offer == "early":  # every request after the first, also the one its first token ended
        assert (early, late) == (len(PROMPTS) + 1, 1), (early, late)
    else:
        assert (early, late) == (0, len(PROMPTS) + 1), (early, late)
