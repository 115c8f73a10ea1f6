"""Prefect flows of gemma-lora-flow, and the ``gemma-lora`` command line that starts them."""
