"""Wire formats: code generated from ``protos/`` (``generated/``), its codegen, and helpers
shared by the gRPC reward server/client and the trajectory dumps."""
