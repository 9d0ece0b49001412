"""Serve's gRPC ingress for the scoring service: ``simex.Scorer/Score``, no protobuf compiler needed.

The request and the reply are the well-known ``google.protobuf.BytesValue``: the request holds what
``POST /v1/score`` takes as ``application/x-npy`` (an ``.npy`` of the fleet's format), the reply the
same JSON answer. Options travel as metadata: ``application`` (``simex``, Serve's routing key),
``x-api-key``, ``per-sample``, ``ranking``, ``strict-format``. An error sets the gRPC status (401
UNAUTHENTICATED, 413/422 INVALID_ARGUMENT, 503 UNAVAILABLE, ...) and its details to the HTTP API's
one-line message.

    import grpc
    from google.protobuf.wrappers_pb2 import BytesValue
    score = grpc.insecure_channel("127.0.0.1:9000").unary_unary(
        SCORE_METHOD, request_serializer=BytesValue.SerializeToString, response_deserializer=BytesValue.FromString)
    answer = json.loads(score(BytesValue(value=npy_bytes), metadata=[("application", "simex")]).value)
"""

from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

SERVICE = "simex.Scorer"
SCORE_METHOD = f"/{SERVICE}/Score"
# Serve imports this by its dotted path in the proxy (gRPCOptions.grpc_servicer_functions).
SERVICER_FUNCTION = "simex_ray.distributed.serving.grpc_api.add_ScorerServicer_to_server"

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
          503: grpc.StatusCode.UNAVAILABLE}


def add_ScorerServicer_to_server(servicer, server) -> None:  # noqa: N802 - the name protoc would generate
    """What ``protoc``'s generated ``add_..._to_server`` does, for the one method ``Score``."""
    handlers = {"Score": grpc.unary_unary_rpc_method_handler(
        servicer.Score, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def metadata(grpc_context) -> dict[str, str]:
    return {k.lower(): v for k, v in grpc_context.invocation_metadata()} if grpc_context is not None else {}


def grpc_status(http_status: int) -> grpc.StatusCode:
    return STATUS.get(http_status, grpc.StatusCode.INTERNAL)
