"""Format adapters: Hugging Face safetensors/.bin, GGUF, and back to Hugging Face."""
