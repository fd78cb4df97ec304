"""Offline API, as vLLM users know it: `LLM(model).generate(prompt_token_ids, SamplingParams())`."""
from __future__ import annotations

from .llm_engine import LLMEngine
from .sequence import RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", **engine_options):
        """`engine_options`: EngineConfig fields, e.g. tensor_parallel_size=2 (one process per
        rank; `close()` or a `with` block stops them)."""
        self.engine = LLMEngine(str(model), device=device, dtype=dtype, **engine_options)
        self._next_id = 0

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt_token_ids: list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generates for every prompt, batched continuously; outputs come in prompt order, with each
        token's logprobs where SamplingParams.logprobs asks (engine/logprobs.py)."""
        if prompt_token_ids and isinstance(prompt_token_ids[0], int):
            raise TypeError("prompt_token_ids must be a list of token-id lists (one per prompt)")
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompt_token_ids)
        if len(params) != len(prompt_token_ids):
            raise ValueError("one SamplingParams per prompt, or one for all")
        engine = self.engine
        ids = []
        for prompt in prompt_token_ids:  # validate all before starting any
            engine.check_request(len(prompt), params[len(ids)])
            ids.append(f"offline-{self._next_id}")
            self._next_id += 1
        done: dict[str, RequestOutput] = {}
        seqs = {}
        try:
            for rid, prompt, p in zip(ids, prompt_token_ids, params):
                seqs[rid] = engine.add_request(rid, prompt, p)
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = seqs[out.request_id].to_output()
        finally:
            for rid in ids:  # after an exception nothing may stay allocated
                if rid not in done:
                    engine.abort(rid)
        return [done[rid] for rid in ids]
