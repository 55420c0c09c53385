"""The monitor side of the wire: the subscriber, the ingest of wire messages and JSONL events into the store,
and the file sources. Never imports the training side or `tui`.
"""
