"""Engines the stages drive: text generation (our Hugging Face decoding loop) and rankers/judges."""
