"""The wire: what both ends agree on (protocol, security, metric names, typed events).

Imports nothing else of rlhf-tui, so the training side and the monitor side can both depend on it.
"""
