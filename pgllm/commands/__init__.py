"""One module per `pgllm` subcommand."""
