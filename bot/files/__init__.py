"""Files in the conversation: Slack files attached to a question or to earlier messages of its thread,
read into the model's context (classify -> download -> extract -> content parts). Pure modules
(`kinds`, `extract`, `parts`) and thin I/O ones (`download`, `resolve`)."""
