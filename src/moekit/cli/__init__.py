"""Command-line interface: ``moekit <subcommand>``, one module per subcommand."""
