"""kimibot: Kimi thinking models in Slack threads, with thread context in Redis."""

__version__ = "0.1.0"
