"""The gRPC ingress's wiring (grpc_api.py), on a real gRPC server and channel; no Ray."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from simex_ray.distributed.serving.grpc_api import SCORE_METHOD, add_ScorerServicer_to_server, grpc_status


class Echo:
    """A servicer as Serve's proxy sees one: Score(request, context)."""

    def Score(self, request, context):  # noqa: N802
        meta = dict(context.invocation_metadata())
        if meta.get("x-api-key") != "k":
            context.abort(grpc_status(401), "missing or wrong X-API-Key")
        return BytesValue(value=request.value[::-1])


@pytest.fixture
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_ScorerServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


def test_score_method_round_trips_bytes_and_metadata(channel):
    score = channel.unary_unary(SCORE_METHOD, request_serializer=BytesValue.SerializeToString,
                                response_deserializer=BytesValue.FromString)
    assert score(BytesValue(value=b"\x93NUMPY"), metadata=[("x-api-key", "k")], timeout=10).value == b"YPMUN\x93"
    with pytest.raises(grpc.RpcError) as e:
        score(BytesValue(value=b"x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "X-API-Key" in e.value.details()


def test_http_statuses_map_to_grpc_codes():
    assert grpc_status(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(413) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(500) == grpc.StatusCode.INTERNAL
