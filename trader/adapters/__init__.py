"""Outside systems, each in its own folder (tradovate/: protocol, rest, socket, feed, broker)."""
