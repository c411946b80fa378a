"""Generated stubs for keybroker.v1 (``make proto``; do not edit)."""
