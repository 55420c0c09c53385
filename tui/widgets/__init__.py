"""The monitor's panes, one widget per module."""
