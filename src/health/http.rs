//! One HTTP/1 connection on the health endpoint, served by hyper: routing, access checks, and
//! the bodies of `/healthz`, `/metrics`, `/status` and `/connections`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::state::State;

/// Request line and headers together may not exceed this (hyper's smallest buffer). A probe's
/// request is well under 200 bytes; anything larger is refused with 431 or 400.
const MAX_REQUEST_BYTES: usize = 8192;
/// A client has this long to send its whole request head (slowloris). Azure's prober sends it at
/// once and gives up after min(interval, 30 s) anyway.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on a whole connection, response included, for clients that stop reading.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The most of a body handed to the socket in one write. A listing of 5,000 connections is
/// 1.5 MB; written whole, one system call could copy up to the socket's send buffer (megabytes
/// on loopback) and run the receiving side's TCP processing in the same stretch, on the core
/// the relay shares with this thread. In pieces this size each write is a few microseconds.
/// (Measured: it did not remove the occasional tail the benchmark's `--listing` mode sees in
/// some paced rounds; see BENCHMARKS.md. It bounds what one write can cost.)
const BODY_PIECE: usize = 16 * 1024;
// hyper's buffer (`max_buf_size`, which also bounds what it gathers before one write) must stay
// smaller than a piece, or several pieces would go out in one write after all.
const _: () = assert!(MAX_REQUEST_BYTES < BODY_PIECE);

/// What a client may ask for, decided from its source address at accept.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// The health path.
    pub probe: bool,
    /// /metrics, /status and /connections.
    pub metrics: bool,
    /// The source is one of the load balancer's probers: its health requests are counted.
    pub prober: bool,
}

/// Serves one request on `stream` and closes it.
pub async fn serve_connection(stream: TcpStream, peer: SocketAddr, access: Access, state: Arc<State>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let answer = respond(&request, peer, access, &state);
        let state = state.clone();
        async move {
            let response = match answer {
                Answer::Now(response) => response,
                Answer::Listing => match super::listing::connections(state).await {
                    Ok(body) => json(body),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                },
            };
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "health endpoint: request failed"),
        Err(_) => tracing::debug!(client = %peer, "health endpoint: connection timed out"),
    }
}

/// What a request gets: an answer at once, or the connection listing, which is built elsewhere
/// (see [`super::listing`]).
enum Answer {
    Now(Response<Pieces>),
    Listing,
}

fn respond(request: &Request<Incoming>, peer: SocketAddr, access: Access, state: &State) -> Answer {
    if request.uri().path() == "/connections" && request.method() == Method::GET && access.metrics {
        return Answer::Listing;
    }
    Answer::Now(respond_now(request, peer, access, state))
}

fn respond_now(
    request: &Request<Incoming>,
    peer: SocketAddr,
    access: Access,
    state: &State,
) -> Response<Pieces> {
    let health = state.health();
    let path = request.uri().path();
    let known = path == health.path || path == "/metrics" || path == "/status" || path == "/connections";
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let allowed = if path == health.path {
        access.probe
    } else {
        access.metrics
    };
    if !allowed {
        return text(StatusCode::FORBIDDEN, "forbidden for this source\n".into());
    }
    if path == health.path {
        if access.prober {
            state.health_probed(peer.ip().to_canonical());
        }
        match state.verdict() {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        }
    } else if path == "/metrics" {
        let mut response = text(StatusCode::OK, crate::metrics::render(state));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    } else if path == "/connections" {
        // HEAD: the listing's headers, without building it.
        json(String::new())
    } else {
        let document = crate::status::StatusDocument::of(state);
        // Serializing plain data into a String cannot fail; an empty object is the fallback.
        let body = serde_json::to_string(&document).unwrap_or_else(|_| "{}".into());
        let mut response = text(StatusCode::OK, body + "\n");
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

fn json(body: String) -> Response<Pieces> {
    let mut response = text(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: String) -> Response<Pieces> {
    let mut response = Response::new(Pieces(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A response body that hyper takes [`BODY_PIECE`] bytes at a time (its write buffer holds less
/// than a piece, so it writes each before asking for the next). Its length is known, so the
/// response still carries Content-Length.
pub struct Pieces(Bytes);

impl Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0.is_empty() {
            return Poll::Ready(None);
        }
        let piece = self.0.len().min(BODY_PIECE);
        Poll::Ready(Some(Ok(Frame::data(self.0.split_to(piece)))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.len() as u64)
    }
}
