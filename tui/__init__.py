"""The monitor side: the Textual app, its panes, the report renderer and the command line."""
