"""OpenRouter integration: key probes and the model catalog.

Nothing here is imported by the lease engine: the engine sees the catalog only
through its ``ModelChooser`` protocol, and probes only through
``LeaseEngine.apply_probe``. The OpenRouter emulator that tests and demos use is
``broker.testing.Emulator``.
"""
