"""The gateway: KServe v2 / Triton protocols over REST and gRPC, routing, executing
placement plans against workers, supervising local workers, and the CLI."""
