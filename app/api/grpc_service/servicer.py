"""`inference.GRPCInferenceService`: the Open Inference Protocol over gRPC, on the services REST uses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from time import perf_counter
from typing import Any

import grpc

from app.api.deps import Authenticator
from app.api.grpc_service import codec, generation
from app.api.grpc_service import inference_pb2 as pb
from app.errors import NotFound, SlimServeError
from app.services.generation import GenerationService
from app.services.inference import PROTOCOL_GRPC, InferenceService

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"  # the name tritonclient and KServe's clients call

_STATUS = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    HTTPStatus.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    HTTPStatus.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    HTTPStatus.INSUFFICIENT_STORAGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Answers a client may retry after a pause, as REST's Retry-After says.
_RETRYABLE = (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE)


def status_of(error: SlimServeError) -> grpc.StatusCode:
    return _STATUS.get(HTTPStatus(error.status_code), grpc.StatusCode.UNKNOWN)


class InferenceServicer:
    def __init__(self, *, inference: InferenceService, auth: Authenticator, server_version: str,
                 is_ready: Callable[[], bool], public_health: bool,
                 generation_service: GenerationService | None = None) -> None:
        self._inference = inference
        self._generation = generation_service
        self._auth = auth
        self._version = server_version
        self._is_ready = is_ready
        self._public_health = public_health

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(method: Callable[..., Any], request: Any, response: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=request.FromString, response_serializer=response.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        })

    async def server_live(self, _request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._health_guard(context)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._health_guard(context)
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def server_metadata(self, _request: pb.ServerMetadataRequest,
                              context: grpc.aio.ServicerContext) -> Any:
        await self._require_key(context)
        return pb.ServerMetadataResponse(name="slimserve", version=self._version, extensions=["binary_tensor_data"])

    async def model_ready(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._require_key(context)
        try:
            await self._inference.describe(request.name, request.version or None)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)  # a readiness probe asks a question: no is an answer
        except SlimServeError as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=True)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._require_key(context)
        try:
            described = await self._inference.describe(request.name, request.version or None)
        except SlimServeError as exc:
            await _abort(context, exc)
        return pb.ModelMetadataResponse(
            name=described["name"], versions=described["versions"], platform=described["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["outputs"]])

    async def model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._require_key(context)
        try:
            if await self._generates(request):
                assert self._generation is not None
                running, _ = await generation.start(self._generation, request)
                return await generation.answer(running, request)  # one answer; `stream` needs ModelStreamInfer
            return await self._infer(request)
        except SlimServeError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("unhandled error in ModelInfer for model %r", request.model_name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    async def model_stream_infer(self, requests: AsyncIterator[pb.ModelInferRequest],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming RPC: one answer per request, in order (a generation with `stream`: one per piece of
        text, then a final one); a failed request answers with its error and the stream goes on."""
        await self._require_key(context)
        async for request in requests:
            try:
                if not await self._generates(request):
                    yield pb.ModelStreamInferResponse(infer_response=await self._infer(request))
                    continue
                assert self._generation is not None
                running, streamed = await generation.start(self._generation, request)
                if not streamed:
                    yield pb.ModelStreamInferResponse(infer_response=await generation.answer(running, request))
                    continue
                async for response in generation.stream(running, request):
                    yield pb.ModelStreamInferResponse(infer_response=response)
            except SlimServeError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)

    async def _generates(self, request: pb.ModelInferRequest) -> bool:
        if self._generation is None:
            return False
        try:
            return await self._generation.serves(request.model_name)
        except SlimServeError:  # an unknown or unready model: the tensor path answers it, and counts it
            return False

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        started = perf_counter()
        limits = self._inference.limits
        answer = await self._inference.infer_tensors(
            name=request.model_name, variant=request.model_version or None, protocol=PROTOCOL_GRPC,
            started=started, decode=lambda entry: codec.decode_request(request, entry.inputs, limits))
        response = codec.encode_response(model=request.model_name, variant=answer.variant, request=answer.request,
                                         names=answer.names, arrays=answer.arrays, specs=answer.specs,
                                         parameters=answer.parameters)
        self._inference.finished(answer, PROTOCOL_GRPC, started)
        return response

    async def _require_key(self, context: grpc.aio.ServicerContext) -> None:
        if not self._auth.enabled:
            return
        try:
            self._auth.require(_metadata(context), "predict")
        except SlimServeError as exc:
            await _abort(context, exc)

    async def _health_guard(self, context: grpc.aio.ServicerContext) -> None:
        if not self._public_health:
            await self._require_key(context)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as headers (keys arrive lower-cased, as HTTP/2 sends them)."""
    return {key: value for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)}


async def _abort(context: grpc.aio.ServicerContext, error: SlimServeError) -> None:
    trailing = (("retry-after", "1"),) if error.status_code in _RETRYABLE else ()
    await context.abort(status_of(error), error.message, trailing_metadata=trailing)
