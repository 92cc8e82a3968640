"""The `sinkscope` command line: one module per subcommand."""
