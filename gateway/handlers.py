"""Rebuilding a gRPC method handler around new behaviour, for the server's interceptors.

An aio interceptor that acts per call (auth, metrics) returns a handler of the same kind and
serializers as the one it was given, whose behaviour wraps the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

# The stubs make these generic; the runtime classes are not subscriptable.
if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Interceptor: TypeAlias = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor

Behavior: TypeAlias = Callable[[Any, Any], Any]

# The method-handler attribute that holds the behaviour, and the factory that rebuilds the
# handler, for each kind: (request_streaming, response_streaming).
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., Handler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def with_behavior(handler: Handler, make: Callable[[Behavior], Behavior]) -> Handler:
    """A handler of the same kind and serializers whose behaviour is `make(the old one)`."""
    attribute, build = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return build(
        make(getattr(handler, attribute)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def service_of(method: str) -> str:
    """The service's full name in a method path, '/package.Service/Method'."""
    return method[1:].rpartition("/")[0]
