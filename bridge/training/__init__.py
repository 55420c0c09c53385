"""The training side: the callback, its publisher thread, the JSONL log, the system sampler, the reward
wrapper and the integration manager. Never imports the monitor side or `tui`.
"""
