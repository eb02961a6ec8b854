//! Baseline C: a tonic gRPC unary echo over loopback TCP, plaintext, in another process: what a
//! user would pick instead of Firebrand for request-reply between two services. Messages are
//! raw bytes (a pass-through codec), so that the row measures gRPC's transport (HTTP/2 framing,
//! tonic's service stack), not a protobuf encoder.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{http, BoxFuture, Bytes, Service};
use tonic::{Request, Response, Status};

/// The echo method's path.
const ECHO_PATH: &str = "/bench.Echo/Echo";

/// Passes bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len)))
    }
}

/// The echo service, as tonic's generated code would write it.
#[derive(Debug, Clone, Copy, Default)]
struct EchoServer;

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "bench.Echo";
}

struct Echo;

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(Response::new(request.into_inner())))
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() != ECHO_PATH {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(BytesCodec)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            Ok(grpc.unary(Echo, request).await)
        })
    }
}

/// Serves the echo on `addr` until the process is killed.
pub async fn serve(addr: std::net::SocketAddr) {
    tonic::transport::Server::builder()
        .add_service(EchoServer)
        .serve(addr)
        .await
        .unwrap();
}

/// A client of the echo: cheap to clone, one HTTP/2 connection under all clones.
#[derive(Clone)]
pub struct GrpcClient(tonic::client::Grpc<tonic::transport::Channel>);

impl GrpcClient {
    /// Connects to the echo at `addr`, retrying while the peer process starts (at most 10 s).
    pub async fn connect(addr: std::net::SocketAddr) -> Self {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .tcp_nodelay(true);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(error) if std::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(error) => panic!("the gRPC peer did not come up: {error}"),
            }
        };
        Self(
            tonic::client::Grpc::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
    }

    /// One unary echo.
    pub async fn echo(&self, payload: Bytes) -> Bytes {
        let mut grpc = self.0.clone();
        grpc.ready().await.unwrap();
        grpc.unary(
            Request::new(payload),
            PathAndQuery::from_static(ECHO_PATH),
            BytesCodec,
        )
        .await
        .unwrap()
        .into_inner()
    }
}
