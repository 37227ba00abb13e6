"""The command-line tools: each parses its arguments and calls the library, never another tool."""
