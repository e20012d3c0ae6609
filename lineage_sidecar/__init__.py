"""Command line, whole-file configuration and the demo that wire proxy and agent together."""
