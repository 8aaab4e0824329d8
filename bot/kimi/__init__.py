"""Everything about talking to Kimi: model profiles, stream events, and the client."""
