"""Speculative decoding: its configuration (vLLM's `speculative_config`) and the
proposers that guess a request's next tokens for the target model to verify."""
from raylm.engine.spec_decode.config import SpeculativeConfig, parse_speculative_config

__all__ = ["SpeculativeConfig", "parse_speculative_config"]
