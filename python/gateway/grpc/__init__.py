"""The gateway's gRPC API from Python: `GatewayClient`, a small typed wrapper over the generated
stubs, and the messages of `protos/gateway/v1/`: `pb` (inference.proto) and `usage_pb`
(usage.proto).

The generated modules (`gateway.grpc.v1`) are made at build time by `gateway.grpc_codegen`.
"""

from gateway.grpc.client import GatewayClient, StreamCall, pb, usage_pb

__all__ = ["GatewayClient", "StreamCall", "pb", "usage_pb"]
