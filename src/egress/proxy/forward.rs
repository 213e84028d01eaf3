//! A plain HTTP request through the proxy (`GET http://host/path HTTP/1.1`): the URL's host checked and
//! connected to, the head rewritten to origin-form with `Connection: close` (one request per connection:
//! what the client sends next goes to the same server, never to another host unchecked), then the bytes
//! relayed both ways.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::conn::Link;
use super::head::Forward;
use super::relay;

/// Serves one plain request; `rest`: the client's bytes after its head (a body, perhaps).
pub(super) async fn serve(link: &Link<'_>, mut client: TcpStream, rest: Vec<u8>, request: Forward) {
    let target = &request.target;
    let mut upstream = match link.open(target).await {
        Ok((_, upstream)) => upstream,
        Err(reason) => return link.refuse(&mut client, Some(target), reason, &"plain HTTP").await,
    };
    link.allowed(target);
    let mut head = request.origin_head();
    let sent = (head.len() + rest.len()) as u64;
    head.extend_from_slice(&rest);
    drop(rest);
    let idle = link.shared.config.idle_timeout;
    match tokio::time::timeout(idle, upstream.write_all(&head)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    drop(head);
    let end = relay::relay(&mut client, &mut upstream, link.limits(), sent).await;
    link.ended(target, end);
}
