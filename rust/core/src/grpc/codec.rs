//! How the gRPC services read and write their messages: prost's codec, except that a request
//! that is not a valid protobuf message is the client's fault (INVALID_ARGUMENT), where tonic
//! answers INTERNAL; and a request over the size limit likewise (tonic says OUT_OF_RANGE), as an
//! oversized HTTP body is 400-class.

use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapOk;
use http::HeaderValue;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The codec of `gateway.v1`'s services (`build.rs` names it).
#[derive(Debug)]
pub struct StrictCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder())
    }
}

#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Wraps a gRPC service: an answer given before anything was streamed (its status in the
/// headers) with OUT_OF_RANGE is tonic's refusal of a request over the size limit, which the
/// services themselves never answer; it leaves as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct OversizeIsInvalid<S>(pub S);

type Remap<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, Req, B> tower_service::Service<Req> for OversizeIsInvalid<S>
where
    S: tower_service::Service<Req, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = MapOk<S::Future, Remap<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.0.call(request).map_ok(remap as Remap<B>)
    }
}

fn remap<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code == HeaderValue::from(tonic::Code::OutOfRange as i32))
    {
        headers.insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::InvalidArgument as i32),
        );
    }
    response
}

/// The layer of `OversizeIsInvalid`, for `tonic::transport::Server::layer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeIsInvalidLayer;

impl<S> tower_layer::Layer<S> for OversizeIsInvalidLayer {
    type Service = OversizeIsInvalid<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeIsInvalid(inner)
    }
}
