//! Forwarding one client request to the agent that serves it, as it is, and its answer back as it comes.
//!
//! What changes on the way: hop-by-hop headers go (those of this connection only, RFC 9110 §7.6.1), but
//! a WebSocket upgrade keeps its `Connection: upgrade` and `Upgrade`; the client's credentials
//! (`authorization`, `x-api-key`) and any owner header it sent go, and the owner the replica's key check
//! found is set in [`OWNER_HEADER`]. `Host` stays, so URLs the agent's handlers build stay right. Both
//! bodies stream (an SSE stream arrives event by event); an SSE stream that breaks off ends with an
//! `error` event, any other body that breaks off ends the client's response there. A `101` bridges the
//! client's upgraded connection and the agent's until either side closes.

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode};
use futures::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::link::{AgentLink, LinkError};
use crate::node::OWNER_HEADER;
use crate::session::Owner;

/// Headers that belong to one connection, never forwarded (besides those its `Connection` names).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The client's credentials and claims, which stop at the replica.
const CREDENTIALS: [HeaderName; 3] =
    [header::AUTHORIZATION, HeaderName::from_static("x-api-key"), HeaderName::from_static(OWNER_HEADER)];

/// Sends `req` to the agent at `addr` on behalf of `owner` (`None`: a signed link, which the agent checks
/// itself) and returns the agent's answer, streaming (see the module doc). Errors are those of
/// [`AgentLink::send`], plus [`LinkError::Protocol`] for a `101` to a request that asked for no upgrade.
pub async fn forward(
    link: &AgentLink,
    addr: SocketAddr,
    req: Request<Body>,
    owner: Option<&Owner>,
) -> Result<Response<Body>, LinkError> {
    let (out, client_upgrade) = prepare(req, owner);
    let mut response = link.send(addr, out).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(LinkError::Protocol { addr, source: "the agent switched protocols unasked".into() });
        };
        let agent_upgrade = hyper::upgrade::on(&mut response);
        let agent_asks = asked_upgrade(response.headers());
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, agent_asks);
        link.spawn(bridge(addr, client_upgrade, agent_upgrade));
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, None);
    let body = if is_event_stream(&parts.headers) { events_ending_in_error(addr, body) } else { body };
    Ok(Response::from_parts(parts, body))
}

/// `req` as the agent gets it: hop-by-hop headers, the client's credentials and owner claim gone, the
/// owner the replica checked set; method, URI, `Host` and body as they came. With it, the client's side of
/// an upgrade it asked for (the agent's request is a new one: none of this server's extensions carry over).
pub fn prepare(mut req: Request<Body>, owner: Option<&Owner>) -> (Request<Body>, Option<OnUpgrade>) {
    let upgrade = asked_upgrade(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    for name in CREDENTIALS {
        parts.headers.remove(name);
    }
    // An owner is a digest (hex, or `anonymous`): always a valid header value.
    if let Some(value) = owner.and_then(|owner| HeaderValue::try_from(owner.0.as_str()).ok()) {
        parts.headers.insert(OWNER_HEADER, value);
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = parts.uri;
    *out.headers_mut() = parts.headers;
    (out, client_upgrade)
}

/// The `Upgrade` header's value when the message asks for an upgrade (`Connection` names `upgrade`).
fn asked_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Removes the hop-by-hop headers and those `Connection` names; with `upgrade`, puts back
/// `Connection: upgrade` and that `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named.into_iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

/// An SSE body passed through event by event; if the agent's stream breaks off, one last `error` event
/// (`{"error":{"code":"agent_protocol_error",...}}`) ends it, so the client learns why instead of
/// seeing a stream that merely stopped.
fn events_ending_in_error(addr: SocketAddr, body: Body) -> Body {
    struct State {
        data: axum::body::BodyDataStream,
        /// Whether what went out so far ends at an event boundary (a blank line).
        at_boundary: bool,
    }
    let state = State { data: body.into_data_stream(), at_boundary: true };
    let stream = futures::stream::unfold(Some(state), move |state| async move {
        let mut state = state?;
        match state.data.next().await {
            Some(Ok(chunk)) => {
                if !chunk.is_empty() {
                    state.at_boundary = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n");
                }
                Some((Ok::<_, std::convert::Infallible>(chunk), Some(state)))
            }
            Some(Err(e)) => {
                tracing::warn!(%addr, error = %e, "the agent's event stream broke off");
                let error = serde_json::json!({"error": {
                    "code": "agent_protocol_error",
                    "message": format!("the agent's stream broke off: {e}"),
                }});
                let lead = if state.at_boundary { "" } else { "\n\n" };
                Some((Ok(Bytes::from(format!("{lead}event: error\ndata: {error}\n\n"))), None))
            }
            None => None,
        }
    });
    Body::from_stream(stream)
}

/// Moves bytes both ways between the client's upgraded connection and the agent's, until either closes.
async fn bridge(addr: SocketAddr, client: OnUpgrade, agent: OnUpgrade) {
    let (client, agent) = match tokio::try_join!(client, agent) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "an upgrade through the replica did not happen");
            return;
        }
    };
    let (mut client, mut agent) = (TokioIo::new(client), TokioIo::new(agent));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
        tracing::debug!(%addr, error = %e, "an upgraded connection through the replica ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_an_upgrade_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade, x-secret"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::HOST, HeaderValue::from_static("example.test"));
        let upgrade = asked_upgrade(&headers);
        assert_eq!(upgrade.as_ref().map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        let mut plain = headers.clone();
        strip_hop_by_hop(&mut headers, upgrade);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::HOST], "example.test");

        strip_hop_by_hop(&mut plain, None);
        assert_eq!(plain.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["host"]);
    }

    #[test]
    fn an_upgrade_header_without_connection_upgrade_asks_nothing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(asked_upgrade(&headers), None);
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert_eq!(asked_upgrade(&headers), None);
    }

    #[test]
    fn event_streams_are_recognised_by_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_event_stream(&headers));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("Text/Event-Stream; charset=utf-8"));
        assert!(is_event_stream(&headers));
    }

    mod through_a_replica {
        use std::sync::{Arc, Mutex};
        use std::time::Duration;

        use axum::Router;
        use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
        use axum::routing::{get, post};
        use futures::SinkExt;
        use tokio::sync::mpsc;
        use tokio_tungstenite::tungstenite::Message;

        use super::*;
        use crate::cluster::testing::{OWNER, Server, spawn_agent, spawn_replica};

        type Chunks = mpsc::Sender<Result<Bytes, std::io::Error>>;

        /// An agent with an echo of what it received, an event stream the test feeds chunk by chunk, and
        /// a WebSocket echo; and a replica in front of it.
        async fn cluster() -> (Server, Server, Chunks) {
            let (chunks, feed) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            let feed = Arc::new(Mutex::new(Some(feed)));
            let router = Router::new()
                .route(
                    "/headers",
                    get(|headers: HeaderMap| async move {
                        let seen: std::collections::BTreeMap<String, String> = headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        axum::Json(seen)
                    }),
                )
                .route("/echo", post(|body: Bytes| async move { body }))
                .route(
                    "/events",
                    get(move || {
                        let feed = feed.lock().unwrap().take().expect("one stream per test");
                        async move {
                            let stream = futures::stream::unfold(feed, |mut feed| async move {
                                feed.recv().await.map(|chunk| (chunk, feed))
                            });
                            ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream))
                        }
                    }),
                )
                .route(
                    "/ws",
                    get(|ws: WebSocketUpgrade| async move {
                        ws.on_upgrade(|mut socket| async move {
                            while let Some(Ok(message)) = socket.recv().await {
                                let reply = match message {
                                    WsMessage::Text(text) => WsMessage::Text(format!("echo: {}", text.as_str()).into()),
                                    WsMessage::Binary(bytes) => WsMessage::Binary(bytes),
                                    WsMessage::Close(_) => break,
                                    _ => continue,
                                };
                                if socket.send(reply).await.is_err() {
                                    break;
                                }
                            }
                        })
                    }),
                );
            let agent = spawn_agent(router).await;
            let replica = spawn_replica(agent.addr).await;
            (agent, replica, chunks)
        }

        async fn within<F: Future>(future: F) -> F::Output {
            tokio::time::timeout(Duration::from_secs(5), future).await.expect("within 5 s")
        }

        fn client() -> reqwest::Client {
            reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
        }

        #[tokio::test]
        async fn credentials_stop_at_the_replica_and_the_owner_is_its_own() {
            let (_agent, replica, _) = cluster().await;
            let seen: std::collections::BTreeMap<String, String> = client()
                .get(format!("http://{}/headers?x=1", replica.addr))
                .header("authorization", "Bearer sk-client")
                .header("x-api-key", "sk-client")
                .header(OWNER_HEADER, "someone-else")
                .header("x-custom", "kept")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(seen.get(OWNER_HEADER).map(String::as_str), Some(OWNER));
            assert!(!seen.contains_key("authorization") && !seen.contains_key("x-api-key"), "{seen:?}");
            assert_eq!(seen.get("x-custom").map(String::as_str), Some("kept"));
            assert_eq!(seen.get("host"), Some(&replica.addr.to_string()), "Host passes through");
        }

        #[tokio::test]
        async fn request_bodies_reach_the_agent() {
            let (_agent, replica, _) = cluster().await;
            let body = "x".repeat(300_000);
            let response =
                client().post(format!("http://{}/echo", replica.addr)).body(body.clone()).send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await.unwrap(), body);
        }

        #[tokio::test]
        async fn an_event_stream_arrives_event_by_event() {
            let (_agent, replica, chunks) = cluster().await;
            let response = client().get(format!("http://{}/events", replica.addr)).send().await.unwrap();
            assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
            let mut body = response.bytes_stream();
            chunks.send(Ok(Bytes::from("event: output\ndata: 1\n\n"))).await.unwrap();
            // The first event arrives while the last is not even written.
            let first = within(body.next()).await.unwrap().unwrap();
            assert_eq!(first, "event: output\ndata: 1\n\n");
            chunks.send(Ok(Bytes::from("event: result\ndata: 2\n\n"))).await.unwrap();
            let last = within(body.next()).await.unwrap().unwrap();
            assert_eq!(last, "event: result\ndata: 2\n\n");
            drop(chunks);
            assert!(within(body.next()).await.is_none(), "the stream ends with the agent's");
        }

        #[tokio::test]
        async fn an_event_stream_that_breaks_off_ends_with_an_error_event() {
            let (_agent, replica, chunks) = cluster().await;
            let response = client().get(format!("http://{}/events", replica.addr)).send().await.unwrap();
            let mut body = response.bytes_stream();
            chunks.send(Ok(Bytes::from("event: output\ndata: 1\n\n"))).await.unwrap();
            assert_eq!(within(body.next()).await.unwrap().unwrap(), "event: output\ndata: 1\n\n");
            chunks.send(Err(std::io::Error::other("agent died"))).await.unwrap();
            let mut rest = Vec::new();
            while let Some(chunk) = within(body.next()).await {
                rest.extend_from_slice(&chunk.expect("the client's stream ends cleanly, with the error event"));
            }
            let rest = String::from_utf8(rest).unwrap();
            assert!(rest.starts_with("event: error\ndata: {"), "{rest:?}");
            assert!(rest.contains("agent_protocol_error") && rest.ends_with("\n\n"), "{rest:?}");
        }

        #[tokio::test]
        async fn a_client_leaving_mid_stream_ends_the_agent_stream() {
            let (_agent, replica, chunks) = cluster().await;
            let response = client().get(format!("http://{}/events", replica.addr)).send().await.unwrap();
            let mut body = response.bytes_stream();
            chunks.send(Ok(Bytes::from("event: output\ndata: 1\n\n"))).await.unwrap();
            within(body.next()).await.unwrap().unwrap();
            drop(body);
            // The replica drops its stream from the agent, and the agent's handler sees its reader gone.
            within(chunks.closed()).await;
        }

        #[tokio::test]
        async fn a_websocket_is_bridged_both_ways() {
            let (_agent, replica, _) = cluster().await;
            let (mut socket, response) =
                tokio_tungstenite::connect_async(format!("ws://{}/ws", replica.addr)).await.unwrap();
            assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
            for round in 0..3 {
                socket.send(Message::text(format!("ping {round}"))).await.unwrap();
                let reply = within(socket.next()).await.unwrap().unwrap();
                assert_eq!(reply, Message::text(format!("echo: ping {round}")));
            }
            socket.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
            let reply = within(socket.next()).await.unwrap().unwrap();
            assert_eq!(reply, Message::binary(vec![0u8, 1, 2, 255]));
            socket.close(None).await.unwrap();
            // The agent's side closes too: the bridge ends, and the client sees the end (in time).
            within(async { while let Some(Ok(_)) = socket.next().await {} }).await;
        }

        #[tokio::test]
        async fn closing_the_link_ends_bridged_connections() {
            let (agent, _, _) = cluster().await;
            let link = crate::cluster::testing::link();
            let replica_link = link.clone();
            let router = Router::new().fallback(move |req: Request<Body>| {
                let link = replica_link.clone();
                async move { forward(&link, agent.addr, req, Some(&Owner(OWNER.into()))).await.unwrap() }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let _server =
                tokio::spawn(crate::api::serve::serve(listener, router, Duration::from_secs(5), stop.clone()));
            let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.unwrap();
            socket.send(Message::text("ping")).await.unwrap();
            assert_eq!(within(socket.next()).await.unwrap().unwrap(), Message::text("echo: ping"));
            within(link.close()).await;
            // The bridge is gone: the client's connection ends.
            within(async { while let Some(Ok(_)) = socket.next().await {} }).await;
            stop.cancel();
        }

        #[tokio::test]
        async fn an_unreachable_agent_is_an_error_not_a_hang() {
            let (agent, replica, _) = cluster().await;
            agent.stop();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let response = client().get(format!("http://{}/headers", replica.addr)).send().await.unwrap();
            assert_eq!(response.status(), 502);
            assert!(response.text().await.unwrap().contains("could not connect"));
        }
    }
}
