"""`ServiceStub`: a client stub for a service of `protos/gateway/v1/`, made at run time from the
service's descriptor in the generated `_pb2` module (`gateway.grpc.INFERENCE_SERVICE`,
`gateway.grpc.USAGE_SERVICE`). It has what grpcio-tools' `_pb2_grpc` stubs have, one
multi-callable per method named after the method, without that generator: the build compiles the
messages only (`rust/python/build.rs`). No servicer side: the gateway's server is Rust.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

__all__ = ["ServiceStub"]


def _multicallable(channel: grpc.Channel, method: MethodDescriptor) -> Any:
    """The channel's multi-callable for `method`: its path, its messages' (de)serialisers and
    its streaming kind."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = GetMessageClass(method.input_type)
    response = GetMessageClass(method.output_type)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    make: Any = kinds[(method.client_streaming, method.server_streaming)]
    return make(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class ServiceStub:
    """Calls `service` on `channel`: `stub.ChatCompletion(request, metadata=..., timeout=...)`,
    one attribute per method of the service, as a `_pb2_grpc` `...Stub` would have."""

    def __init__(self, channel: grpc.Channel, service: ServiceDescriptor) -> None:
        self.service = service
        self._methods = {m.name: _multicallable(channel, m) for m in service.methods}

    def __getattr__(self, name: str) -> Any:
        # Only names that are no attribute get here; through `__dict__`, so that a stub being
        # copied (no `__init__` run yet) does not recurse.
        methods: dict[str, Any] = self.__dict__.get("_methods", {})
        if name not in methods:
            raise AttributeError(f"{type(self).__name__} has no method {name!r}")
        return methods[name]
