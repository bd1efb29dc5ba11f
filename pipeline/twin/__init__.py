"""The hub twin: offline stand-ins of the gpt2-small preset's Hugging Face repos (see build.py)."""
