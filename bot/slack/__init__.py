"""Slack output: rendering within Slack's limits (pure) and the writer that posts into threads (I/O)."""
