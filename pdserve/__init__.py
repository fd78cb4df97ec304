"""pdserve: LLM serving with prefill and decode disaggregated onto separate worker pools."""

__version__ = "0.1.0"
