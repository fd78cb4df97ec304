"""`pdserve serve` on GPUs 0 and 1 (prefill and decode workers, or two `both` workers), via `openai`."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gpu.conftest import requires_two_gpus
from tests.serving.conftest import start_serve, stop

pytestmark = requires_two_gpus


@pytest.mark.parametrize("transport,mode", [("zmq", "disaggregated"), ("nccl", "disaggregated"),
                                            ("nccl", "colocated"), ("nccl", "adaptive")])
def test_two_gpu_serve_matches_transformers(demo_model, transport, mode):
    s = start_serve(demo_model, "--device", "cuda", "--dtype", "float32", "--prefill-gpus", "0",
                    "--decode-gpus", "1", "--kv-transport", transport, "--mode", mode)
    try:
        tok = AutoTokenizer.from_pretrained(demo_model)
        hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).cuda().eval()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        qs = [f"Question {i}: what is {i} squared?" for i in range(16)]

        def one(q):
            return c.chat.completions.create(model="demo", messages=[{"role": "user", "content": q}],
                                             max_tokens=24, temperature=0).choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, qs))
        for q, text in zip(qs, got):
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                     tokenize=False), add_special_tokens=False)
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
            assert text == tok.decode(ref, skip_special_tokens=True)
    finally:
        stop(s.procs)
