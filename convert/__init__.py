"""Format adapters. Libraries: convert.hf (Hugging Face -> ours), convert.gguf_file (GGUF -> ours),
convert.hf_export (ours -> Hugging Face), convert.default_model (the embedded default model).
CLIs: `python -m convert.from_hf | convert.from_gguf | convert.to_hf`."""
