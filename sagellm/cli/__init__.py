"""The `sage-llm` command."""
