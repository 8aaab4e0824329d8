"""Small loopback servers that speak Slack's and Kimi's real wire formats, for tests and benchmarks."""
