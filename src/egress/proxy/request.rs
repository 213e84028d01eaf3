//! One session connection, after its opening line: the client's request head read (bounded in size and
//! time) and parsed, then handed to `tunnel` (`CONNECT`) or `forward` (plain HTTP).

use tokio::net::TcpStream;

use super::conn::Link;
use super::head::{self, HeadError, ReadError, Request};
use super::{forward, tunnel};
use crate::egress::link::Reason;

/// Serves one session connection; `first`: the client's bytes read with the opening line.
pub(super) async fn serve(mut client: TcpStream, first: Vec<u8>, link: Link<'_>) {
    let head_timeout = link.shared.config.head_timeout;
    let (mut buf, end) = match tokio::time::timeout(head_timeout, head::read(&mut client, first)).await {
        Ok(Ok(read)) => read,
        // Asked nothing, or gone: nothing to refuse.
        Ok(Err(ReadError::Closed { empty: true } | ReadError::Io(_))) => return,
        Ok(Err(e)) => return link.refuse(&mut client, None, Reason::BadRequest, &e).await,
        Err(_) => return link.refuse(&mut client, None, Reason::BadRequest, &"the request head took too long").await,
    };
    let rest = buf.split_off(end);
    match head::parse(&buf) {
        Ok(Request::Connect(target)) => tunnel::serve(&link, client, rest, target).await,
        Ok(Request::Forward(request)) => forward::serve(&link, client, rest, request).await,
        Err(HeadError::HostMismatch(target)) => {
            link.refuse(&mut client, Some(&target), Reason::HostMismatch, &HeadError::HostMismatch(target.clone()))
                .await
        }
        Err(e) => link.refuse(&mut client, None, Reason::BadRequest, &e).await,
    }
}
