"""pdserve's engine: paged-KV execution of Llama-family models, shared by every worker."""
from .config import EngineConfig, ModelConfig, UnsupportedModelError
from .llm import LLM
from .llm_engine import LLMEngine, RequestRejected, StepOutput
from .sequence import RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "EngineConfig", "ModelConfig",
           "RequestRejected", "StepOutput", "UnsupportedModelError"]
