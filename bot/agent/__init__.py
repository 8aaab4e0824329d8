"""The agent loop: model step -> tool calls -> results -> next step, within caps."""
