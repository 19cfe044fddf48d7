"""Infrastructure: settings, output storage, media sniffing, outbound destination guard, metrics,
logs, and the private redis-server for development and tests."""
