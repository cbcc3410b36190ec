"""Hugging Face Llama-family models: import into the run's shardings (`load`), export of a run (`export`)."""
