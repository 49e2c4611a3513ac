"""The gateway's gRPC API from Python: `GatewayClient`, a small typed wrapper over the gateway's
services; the messages of `protos/gateway/v1/`, `pb` (inference.proto) and `usage_pb`
(usage.proto); and `ServiceStub` over `INFERENCE_SERVICE` or `USAGE_SERVICE` for raw calls (your
own metadata, no key).

The messages (`gateway.grpc.v1`, `*_pb2.py` and `*_pb2.pyi`) are compiled from the protos when the
extension is built (`rust/python/build.rs`): they are in the wheel, never in the repository.
"""

from gateway.grpc.client import (
    INFERENCE_SERVICE,
    USAGE_SERVICE,
    GatewayClient,
    StreamCall,
    pb,
    usage_pb,
)
from gateway.grpc.stub import ServiceStub

__all__ = [
    "INFERENCE_SERVICE",
    "USAGE_SERVICE",
    "GatewayClient",
    "ServiceStub",
    "StreamCall",
    "pb",
    "usage_pb",
]
