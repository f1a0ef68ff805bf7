"""Other frameworks' checkpoints in and out (`hf.py`: Hugging Face safetensors folders)."""
