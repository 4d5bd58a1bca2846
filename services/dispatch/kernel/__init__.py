"""The kernel: runs turns — a loop of steps, each streaming one provider
response and running the tool calls it contains — and streams their events."""
