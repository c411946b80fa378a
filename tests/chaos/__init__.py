"""A seeded, randomized fault campaign with a history checker (Jepsen's way; issue 16).

``campaign`` starts the real processes, runs clients and the nemesis and records every
operation (``history``); ``checker`` verifies the seven invariants; ``proxy`` is the TCP proxy
between each replica and Redis. ``python -m tests.chaos`` (``make chaos``) runs one campaign;
tests/test_chaos.py runs a short fixed-seed one inside the suite. Results: docs/chaos.md.
"""
