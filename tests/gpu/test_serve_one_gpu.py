"""A prefill and a decode worker sharing one GPU: the decode worker copies the KV straight out of the
prefill worker's cache (kvtransfer/same_gpu.py, CUDA IPC) and spaces its steps while the prefill
worker computes prompts (decode_worker/pacing.py), and the text equals transformers'."""
from __future__ import annotations

import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gpu.conftest import requires_cuda
from tests.serving.conftest import start_serve, stop

pytestmark = requires_cuda


def test_one_gpu_prefill_and_decode_worker_share_kv_on_the_gpu(demo_model):
    with tempfile.TemporaryFile("w+") as log:
        s = start_serve(demo_model, "--device", "cuda", "--dtype", "float32", "--prefill-gpus", "0",
                        "--decode-gpus", "0", "--gpu-memory-utilization", "0.2", "--kv-transport", "zmq",
                        # a few prompts a prefill step: the decode worker decodes the first while the
                        # prefill worker computes the rest
                        "--max-num-batched-tokens", "64",
                        stdout=log, stderr=subprocess.STDOUT)
        try:
            tok = AutoTokenizer.from_pretrained(demo_model)
            hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).cuda().eval()
            qs = [f"Question {i}: what is {i} cubed?" for i in range(16)]

            def one(q):
                r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                               json={"model": "demo", "messages": [{"role": "user", "content": q}], "max_tokens": 24,
                                     "temperature": 0})
                return r.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(16) as pool:  # twice: the first teaches the prefill worker its speed
                got = list(pool.map(one, qs)) + list(pool.map(one, qs))
            for q, text in zip(qs + qs, got):
                ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                                         add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False)
                ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
                assert text == tok.decode(ref, skip_special_tokens=True)
        finally:
            stop(s.procs)
        log.seek(0)
        out = log.read()
    assert "is on this GPU: its KV is copied straight out of its cache" in out, out[-3000:]
    # 16 prompts at once: the decode worker spaced its steps while the prefill worker computed them
    assert "a prefill worker on this GPU is computing prompts" in out, out[-3000:]
