"""Generated from protos/ by ``python -m services.rpc.codegen``; do not edit."""
