"""The LoRA engine: loading a causal LM, FFN LoRA factors, injecting them per sample without an
adapter library, storing them, prompts and batched generation."""
