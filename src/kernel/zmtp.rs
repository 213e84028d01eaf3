//! A minimal ZMTP 3.0 peer (rfc.zeromq.org/spec/23, NULL mechanism): the greeting, the READY handshake, and
//! a bounded, cancel-safe frame reader and writer over any byte stream.
//!
//! Why our own and not the `zeromq` crate on the service side: its codec grows its buffer to whatever size a
//! frame announces (a kernel publishing one 600 MB message cost the service 1.7 GB), and its bound sockets
//! accept any number of peers and round-robin sends among them. Here every read goes into one fixed buffer
//! that this struct owns, and frame bodies come out as slices of it ([`Event::Data`]): the caller decides
//! what to keep, so nothing a peer announces is ever allocated up front. The Jupyter layer on top is
//! `wire.rs`.
//!
//! The buffer is small while a connection is quiet ([`MIN_READ_BUFFER`]: four per session, hundreds of
//! sessions) and doubles, up to [`READ_BUFFER`], while reads keep filling it (a large frame arriving); it
//! goes back to the small size once everything read has been handed out at a message boundary.
//!
//! Cancel safety: [`ZmtpStream::next_event`] never waits, and [`ZmtpStream::fill`] is a single read into the
//! owned buffer, so a caller that drops a read future (e.g. in `tokio::select!`) loses no byte. Writes are
//! queued in an owned buffer and [`ZmtpStream::flush`] resumes where a dropped flush stopped, so a cancelled
//! send never leaves half a frame on the wire. A flush waits for the peer to read: callers bound it with a
//! timeout.
//!
//! What this module does not do: other mechanisms (PLAIN, CURVE), ZMTP 1.0/2.0 peers, answering PING
//! (commands after the handshake are skipped; Jupyter kernels do not enable ZMTP heartbeats), routing.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest read buffer of one connection: the most a connection holds of what the peer sent before the
/// layer above has looked at it.
const READ_BUFFER: usize = 32 * 1024;
/// The read buffer of a quiet connection; also room for a greeting and a usual READY.
const MIN_READ_BUFFER: usize = 2 * 1024;
/// The largest handshake command (the peer's READY) we read; libzmq's is well under 100 bytes.
const MAX_HANDSHAKE_COMMAND: usize = 8 * 1024;
/// The greeting is always 64 bytes.
const GREETING_LEN: usize = 64;

const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// What went wrong on a ZMTP connection. Every variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    #[error("connection i/o failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a frame or message")]
    Truncated,
    #[error("the peer did not send a ZMTP 3 greeting: {0}")]
    BadGreeting(&'static str),
    #[error("the peer speaks ZMTP {0}.{1}; only 3.x is supported")]
    UnsupportedVersion(u8, u8),
    #[error("the peer asks for security mechanism `{0}`; only NULL is supported")]
    UnsupportedMechanism(String),
    #[error("the peer's handshake is malformed: {0}")]
    BadHandshake(&'static str),
    #[error("the peer refused the handshake: {0}")]
    PeerError(String),
    #[error("the peer is a {peer} socket, which cannot talk to our {ours}")]
    IncompatibleSocket { ours: &'static str, peer: String },
    #[error("the peer sent a malformed frame: {0}")]
    BadFrame(&'static str),
}

/// The socket types this client plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// shell, control, stdin: talks to the kernel's ROUTER.
    Dealer,
    /// IOPub: subscribes to everything the kernel's PUB (or XPUB) publishes.
    Sub,
}

impl SocketType {
    fn name(self) -> &'static str {
        match self {
            SocketType::Dealer => "DEALER",
            SocketType::Sub => "SUB",
        }
    }

    /// The peer types we accept (RFC 23, "The Socket Type"), narrowed to what a Jupyter kernel binds.
    fn accepts(self, peer: &[u8]) -> bool {
        match self {
            SocketType::Dealer => peer == b"ROUTER",
            SocketType::Sub => peer == b"PUB" || peer == b"XPUB",
        }
    }
}

/// One piece of what the peer sent, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A message frame starts; `len` is what the peer announced (not yet received, maybe never).
    Start { len: u64, more: bool },
    /// The next bytes of the current frame (at most one read buffer).
    Data(&'a [u8]),
    /// The current frame is complete; `more == false` ends the message.
    End { more: bool },
}

#[derive(Debug, Clone, Copy)]
enum ReadState {
    /// Waiting for a frame's flags and size.
    Header,
    /// Inside a frame's body. Command frames (`command == true`) are skipped without events.
    Body { remaining: u64, more: bool, command: bool },
}

/// A ZMTP connection after (or during) the handshake. Owns the stream and both buffers.
pub struct ZmtpStream<S> {
    io: S,
    /// Bytes read but not yet handed out are `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    state: ReadState,
    /// The last complete frame had MORE set: an EOF now cuts a message.
    in_message: bool,
    /// Encoded frames not yet written are `out[written..]`.
    out: Vec<u8>,
    written: usize,
    /// Bytes read from the peer so far (a message still arriving shows as progress here).
    bytes_in: u64,
    /// The last read filled the buffer: the peer likely has more, so the next read gets a larger one.
    filled: bool,
}

impl<S> ZmtpStream<S> {
    /// Bytes read from the peer so far, complete messages or not.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ZmtpStream<S> {
    /// Greets the peer and exchanges READY commands as `ours` (with `identity` for a DEALER); for a SUB,
    /// also queues the subscription to every topic. Not cancel-safe: dropping it mid-way drops the stream.
    pub async fn handshake(io: S, ours: SocketType, identity: Option<&[u8]>) -> Result<Self, ZmtpError> {
        let mut stream = ZmtpStream {
            io,
            buf: vec![0; MIN_READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            state: ReadState::Header,
            in_message: false,
            out: Vec::new(),
            written: 0,
            bytes_in: 0,
            filled: false,
        };
        stream.out.extend_from_slice(&greeting());
        stream.flush().await?;
        let peer = stream.read_exact_64().await?;
        check_greeting(&peer)?;

        let mut props: Vec<(&str, &[u8])> = vec![("Socket-Type", ours.name().as_bytes())];
        if let Some(identity) = identity {
            props.push(("Identity", identity));
        }
        stream.queue_command(b"READY", &props);
        stream.flush().await?;
        let command = stream.read_command().await?;
        let (name, body) = split_command(&command)?;
        match name {
            b"READY" => {}
            b"ERROR" => {
                let reason = body.get(1..).unwrap_or_default();
                return Err(ZmtpError::PeerError(String::from_utf8_lossy(reason).into_owned()));
            }
            _ => return Err(ZmtpError::BadHandshake("the first command is not READY")),
        }
        let socket_type = properties(body)?
            .find(|(k, _)| k.eq_ignore_ascii_case(b"Socket-Type"))
            .map(|(_, v)| v)
            .ok_or(ZmtpError::BadHandshake("READY has no Socket-Type"))?;
        if !ours.accepts(socket_type) {
            return Err(ZmtpError::IncompatibleSocket {
                ours: ours.name(),
                peer: String::from_utf8_lossy(&socket_type[..socket_type.len().min(32)]).into_owned(),
            });
        }
        if ours == SocketType::Sub {
            // ZMTP 3.0 subscription: a message whose one frame is 0x01 + topic (the empty topic: all).
            stream.queue_message(&[&[0x01]]);
            stream.flush().await?;
        }
        Ok(stream)
    }

    /// The next event from what is already buffered, without waiting; `None` means call [`Self::fill`].
    /// Command frames (e.g. PING) are skipped.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, ZmtpError> {
        loop {
            match self.state {
                ReadState::Header => {
                    let available = self.end - self.start;
                    if available < 2 {
                        return Ok(None);
                    }
                    let flags = self.buf[self.start];
                    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
                        return Err(ZmtpError::BadFrame("reserved flag bits are set"));
                    }
                    let command = flags & FLAG_COMMAND != 0;
                    let more = flags & FLAG_MORE != 0;
                    if command && more {
                        return Err(ZmtpError::BadFrame("a command frame has the MORE flag"));
                    }
                    let (len, header_len) = if flags & FLAG_LONG != 0 {
                        if available < 9 {
                            return Ok(None);
                        }
                        let bytes: [u8; 8] = self.buf[self.start + 1..self.start + 9].try_into().expect("8 bytes");
                        (u64::from_be_bytes(bytes), 9)
                    } else {
                        (u64::from(self.buf[self.start + 1]), 2)
                    };
                    self.start += header_len;
                    self.state = ReadState::Body { remaining: len, more, command };
                    if command {
                        if self.in_message {
                            return Err(ZmtpError::BadFrame("a command frame inside a multipart message"));
                        }
                        continue;
                    }
                    return Ok(Some(Event::Start { len, more }));
                }
                ReadState::Body { remaining: 0, more, command } => {
                    self.state = ReadState::Header;
                    if command {
                        continue;
                    }
                    self.in_message = more;
                    return Ok(Some(Event::End { more }));
                }
                ReadState::Body { remaining, more, command } => {
                    let available = self.end - self.start;
                    if available == 0 {
                        return Ok(None);
                    }
                    // `available` fits the buffer, so the minimum fits a usize.
                    let n = usize::try_from(remaining.min(available as u64)).expect("bounded by the buffer");
                    let from = self.start;
                    self.start += n;
                    self.state = ReadState::Body { remaining: remaining - n as u64, more, command };
                    if command {
                        continue;
                    }
                    return Ok(Some(Event::Data(&self.buf[from..from + n])));
                }
            }
        }
    }

    /// Reads once from the peer into the buffer. Cancel-safe. EOF is an error ([`ZmtpError::Closed`], or
    /// [`ZmtpError::Truncated`] inside a frame or message).
    pub async fn fill(&mut self) -> Result<(), ZmtpError> {
        self.compact();
        self.resize();
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            let clean = matches!(self.state, ReadState::Header) && self.start == self.end && !self.in_message;
            return Err(if clean { ZmtpError::Closed } else { ZmtpError::Truncated });
        }
        self.end += n;
        self.bytes_in += n as u64;
        self.filled = self.end == self.buf.len();
        Ok(())
    }

    /// Before a read: back to the small buffer when nothing is held between messages; a larger one when the
    /// last read filled it or it is full (a handshake command larger than the small buffer). Keeps every
    /// byte not yet handed out, so a read cancelled after it loses nothing.
    fn resize(&mut self) {
        let quiet = self.start == self.end && matches!(self.state, ReadState::Header) && !self.in_message;
        let len = self.buf.len();
        if quiet && len > MIN_READ_BUFFER {
            self.buf = vec![0; MIN_READ_BUFFER].into_boxed_slice();
            self.start = 0;
            self.end = 0;
        } else if (self.filled || self.end == len) && len < READ_BUFFER {
            let mut larger = vec![0; (len * 2).min(READ_BUFFER)].into_boxed_slice();
            larger[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = larger;
        }
        self.filled = false;
        debug_assert!(self.end < self.buf.len(), "a read always has room");
    }

    /// Reads and throws away whatever arrives until the peer closes (or the stream fails). Cancel-safe.
    pub async fn drain(&mut self) -> Result<(), ZmtpError> {
        loop {
            self.start = 0;
            self.end = 0;
            if self.io.read(&mut self.buf).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Queues one message (its frames, MORE set on all but the last) for [`Self::flush`]. An empty
    /// message is not a thing in ZMTP; `frames` must not be empty.
    pub fn queue_message(&mut self, frames: &[&[u8]]) {
        debug_assert!(!frames.is_empty(), "a ZMTP message has at least one frame");
        for (i, frame) in frames.iter().enumerate() {
            let more = i + 1 < frames.len();
            self.queue_frame(frame, if more { FLAG_MORE } else { 0 });
        }
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes everything queued. Cancel-safe: a dropped flush resumes where it stopped on the next call.
    /// Waits as long as the peer does not read: bound it with a timeout.
    pub async fn flush(&mut self) -> Result<(), ZmtpError> {
        while self.written < self.out.len() {
            let n = self.io.write(&self.out[self.written..]).await?;
            if n == 0 {
                return Err(ZmtpError::Closed);
            }
            self.written += n;
        }
        self.io.flush().await?;
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > READ_BUFFER {
            // A large request was sent; do not keep its buffer for the life of the connection.
            self.out = Vec::new();
        }
        Ok(())
    }

    fn queue_frame(&mut self, body: &[u8], flags: u8) {
        if body.len() > 255 {
            self.out.push(flags | FLAG_LONG);
            self.out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            self.out.push(flags);
            self.out.push(body.len() as u8);
        }
        self.out.extend_from_slice(body);
    }

    fn queue_command(&mut self, name: &[u8], props: &[(&str, &[u8])]) {
        let mut body = Vec::with_capacity(64);
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        for (key, value) in props {
            body.push(key.len() as u8);
            body.extend_from_slice(key.as_bytes());
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        self.queue_frame(&body, FLAG_COMMAND);
    }

    /// Moves unread bytes to the front so a read has room.
    /// Only a partial frame header (or a partial handshake) is left when a caller reads, so this copies
    /// a few bytes at most; [`Self::resize`] makes room if that is not enough.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    async fn read_exact_64(&mut self) -> Result<[u8; GREETING_LEN], ZmtpError> {
        while self.end - self.start < GREETING_LEN {
            self.fill_handshake().await?;
        }
        let greeting: [u8; GREETING_LEN] = self.buf[self.start..self.start + GREETING_LEN].try_into().expect("64");
        self.start += GREETING_LEN;
        Ok(greeting)
    }

    /// Reads one command frame of at most [`MAX_HANDSHAKE_COMMAND`] bytes; returns its body.
    async fn read_command(&mut self) -> Result<Vec<u8>, ZmtpError> {
        while self.end - self.start < 2 {
            self.fill_handshake().await?;
        }
        let flags = self.buf[self.start];
        let header_len = match flags {
            0x04 => 2,
            0x06 => 9,
            _ => return Err(ZmtpError::BadHandshake("expected a command frame")),
        };
        while self.end - self.start < header_len {
            self.fill_handshake().await?;
        }
        let len = if header_len == 2 {
            u64::from(self.buf[self.start + 1])
        } else {
            u64::from_be_bytes(self.buf[self.start + 1..self.start + 9].try_into().expect("8 bytes"))
        };
        if len > MAX_HANDSHAKE_COMMAND as u64 {
            return Err(ZmtpError::BadHandshake("the handshake command is too large"));
        }
        let len = len as usize;
        self.start += header_len;
        while self.end - self.start < len {
            self.fill_handshake().await?;
        }
        let body = self.buf[self.start..self.start + len].to_vec();
        self.start += len;
        Ok(body)
    }

    async fn fill_handshake(&mut self) -> Result<(), ZmtpError> {
        self.fill().await.map_err(|e| match e {
            ZmtpError::Closed | ZmtpError::Truncated => ZmtpError::BadHandshake("the peer closed during the handshake"),
            other => other,
        })
    }
}

/// Our greeting: ZMTP 3.0, NULL mechanism, as-server = 0.
fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn check_greeting(g: &[u8; GREETING_LEN]) -> Result<(), ZmtpError> {
    if g[0] != 0xFF || g[9] != 0x7F {
        return Err(ZmtpError::BadGreeting("wrong signature"));
    }
    // A peer must accept higher versions (RFC 23); 3.1 only adds commands we do not use.
    if g[10] != 3 {
        return Err(ZmtpError::UnsupportedVersion(g[10], g[11]));
    }
    let mechanism = &g[12..32];
    let name_len = mechanism.iter().position(|&b| b == 0).unwrap_or(mechanism.len());
    if &mechanism[..name_len] != b"NULL" || mechanism[name_len..].iter().any(|&b| b != 0) {
        return Err(ZmtpError::UnsupportedMechanism(String::from_utf8_lossy(&mechanism[..name_len]).into_owned()));
    }
    Ok(())
}

/// A command body as (name, rest).
fn split_command(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let (&name_len, rest) = body.split_first().ok_or(ZmtpError::BadHandshake("an empty command"))?;
    let name_len = usize::from(name_len);
    if rest.len() < name_len {
        return Err(ZmtpError::BadHandshake("the command name exceeds the frame"));
    }
    Ok(rest.split_at(name_len))
}

/// The (name, value) properties of a READY command body, all checked before any is returned.
fn properties(mut body: &[u8]) -> Result<impl Iterator<Item = (&[u8], &[u8])>, ZmtpError> {
    let bad = ZmtpError::BadHandshake;
    let mut props = Vec::new();
    while let Some((&name_len, rest)) = body.split_first() {
        let name_len = usize::from(name_len);
        if rest.len() < name_len + 4 {
            return Err(bad("a property exceeds the frame"));
        }
        let (name, rest) = rest.split_at(name_len);
        let (size, rest) = rest.split_at(4);
        let size = u32::from_be_bytes(size.try_into().expect("4 bytes")) as usize;
        if rest.len() < size {
            return Err(bad("a property value exceeds the frame"));
        }
        let (value, rest) = rest.split_at(size);
        props.push((name, value));
        body = rest;
    }
    Ok(props.into_iter())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// The peer's side of a handshake, written by hand: greeting, READY with `socket_type`.
    pub(crate) fn peer_handshake_bytes(socket_type: &[u8]) -> Vec<u8> {
        let mut bytes = greeting().to_vec();
        bytes[11] = 1; // libzmq announces 3.1
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        body.push(11);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type);
        bytes.push(FLAG_COMMAND);
        bytes.push(body.len() as u8);
        bytes.extend_from_slice(&body);
        bytes
    }

    /// A frame as bytes.
    pub(crate) fn frame(body: &[u8], more: bool) -> Vec<u8> {
        let flags = if more { FLAG_MORE } else { 0 };
        let mut out = Vec::new();
        if body.len() > 255 {
            out.push(flags | FLAG_LONG);
            out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            out.push(flags);
            out.push(body.len() as u8);
        }
        out.extend_from_slice(body);
        out
    }

    /// Handshakes as `ours` against a scripted peer of type `peer`; returns our stream and the peer's end
    /// (with our greeting and READY already read from it).
    async fn connected(ours: SocketType, peer: &[u8]) -> (ZmtpStream<DuplexStream>, DuplexStream) {
        let (a, mut b) = duplex(1 << 16);
        b.write_all(&peer_handshake_bytes(peer)).await.unwrap();
        let identity = (ours == SocketType::Dealer).then_some(&b"me"[..]);
        let stream = ZmtpStream::handshake(a, ours, identity).await.unwrap();
        let mut head = [0u8; 64];
        b.read_exact(&mut head).await.unwrap();
        assert_eq!(head, greeting());
        (stream, b)
    }

    /// Every event until a message ends, with data chunks joined per frame.
    async fn message(s: &mut ZmtpStream<DuplexStream>) -> Result<Vec<Vec<u8>>, ZmtpError> {
        let mut frames = Vec::new();
        loop {
            while let Some(event) = s.next_event()? {
                match event {
                    Event::Start { .. } => frames.push(Vec::new()),
                    Event::Data(d) => frames.last_mut().unwrap().extend_from_slice(d),
                    Event::End { more: false } => return Ok(frames),
                    Event::End { more: true } => {}
                }
            }
            s.fill().await?;
        }
    }

    #[tokio::test]
    async fn a_dealer_handshake_sends_greeting_ready_with_identity() {
        let (_s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        let mut head = [0u8; 2];
        b.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], FLAG_COMMAND);
        let mut body = vec![0u8; head[1] as usize];
        b.read_exact(&mut body).await.unwrap();
        let (name, rest) = split_command(&body).unwrap();
        assert_eq!(name, b"READY");
        let props: Vec<_> = properties(rest).unwrap().collect();
        assert_eq!(props, vec![(&b"Socket-Type"[..], &b"DEALER"[..]), (&b"Identity"[..], &b"me"[..])]);
    }

    #[tokio::test]
    async fn a_sub_subscribes_to_everything_after_the_handshake() {
        let (_s, mut b) = connected(SocketType::Sub, b"XPUB").await;
        let mut rest = vec![0u8; 2 + 1 + 5 + 1 + 11 + 4 + 3 + 3]; // READY(Socket-Type=SUB) + subscription
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest[rest.len() - 3..], &[0x00, 0x01, 0x01]);
    }

    #[tokio::test]
    async fn incompatible_or_strange_peers_are_refused() {
        for (ours, peer) in [(SocketType::Dealer, &b"PUB"[..]), (SocketType::Sub, b"ROUTER"), (SocketType::Dealer, b"")]
        {
            let (a, mut b) = duplex(1 << 16);
            b.write_all(&peer_handshake_bytes(peer)).await.unwrap();
            let err = ZmtpStream::handshake(a, ours, None).await.err().unwrap();
            assert!(matches!(err, ZmtpError::IncompatibleSocket { .. }), "{err}");
        }
        let mut wrong_version = peer_handshake_bytes(b"ROUTER");
        wrong_version[10] = 2;
        let mut curve = peer_handshake_bytes(b"ROUTER");
        curve[12..17].copy_from_slice(b"CURVE");
        let mut no_signature = peer_handshake_bytes(b"ROUTER");
        no_signature[0] = b'G'; // e.g. an HTTP client
        let mut huge_ready = greeting().to_vec();
        huge_ready.extend_from_slice(&[0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        let mut not_ready = greeting().to_vec();
        not_ready.extend_from_slice(&[0x04, 5, 4, b'P', b'I', b'N', b'G']);
        let mut error = greeting().to_vec();
        error.extend_from_slice(&[0x04, 8, 5, b'E', b'R', b'R', b'O', b'R', 1, b'x']);
        let mut bad_props = greeting().to_vec();
        bad_props.extend_from_slice(&[0x04, 9, 5, b'R', b'E', b'A', b'D', b'Y', 11, b'S', b'o']);
        for bytes in [wrong_version, curve, no_signature, huge_ready, not_ready, error, bad_props] {
            let (a, mut b) = duplex(1 << 16);
            b.write_all(&bytes).await.unwrap();
            drop(b.shutdown().await);
            let err = ZmtpStream::handshake(a, SocketType::Dealer, None).await.err().unwrap();
            assert!(!matches!(err, ZmtpError::IncompatibleSocket { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_closes_during_the_handshake_is_an_error() {
        let (a, mut b) = duplex(1 << 16);
        b.write_all(&greeting()[..30]).await.unwrap();
        drop(b);
        assert!(ZmtpStream::handshake(a, SocketType::Dealer, None).await.is_err());
    }

    #[tokio::test]
    async fn frames_are_read_short_and_long_and_commands_are_skipped() {
        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        let long = vec![7u8; 1000];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[0x04, 5, 4, b'P', b'I', b'N', b'G']); // a PING between messages
        bytes.extend(frame(b"a", true));
        bytes.extend(frame(b"", true));
        bytes.extend(frame(&long, false));
        b.write_all(&bytes).await.unwrap();
        assert_eq!(message(&mut s).await.unwrap(), vec![b"a".to_vec(), vec![], long]);
    }

    #[tokio::test]
    async fn one_byte_at_a_time_gives_the_same_frames() {
        let (a, b) = duplex(1);
        let (mut rb, mut wb) = tokio::io::split(b);
        let mut bytes = peer_handshake_bytes(b"ROUTER");
        bytes.extend(frame(b"hello", true));
        bytes.extend(frame(&[9u8; 300], false));
        // Our side's writes, read one byte at a time too, until it closes.
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while rb.read(&mut byte).await.unwrap_or(0) == 1 {}
        });
        let writer = tokio::spawn(async move {
            for byte in bytes {
                wb.write_all(&[byte]).await.unwrap();
            }
            reader.await.unwrap();
        });
        let mut s = ZmtpStream::handshake(a, SocketType::Dealer, None).await.unwrap();
        assert_eq!(message(&mut s).await.unwrap(), vec![b"hello".to_vec(), vec![9u8; 300]]);
        drop(s);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_cut_mid_frame_is_truncated_and_between_messages_closed() {
        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        let f = frame(&[1u8; 100], false);
        b.write_all(&f[..50]).await.unwrap();
        drop(b);
        assert!(matches!(message(&mut s).await, Err(ZmtpError::Truncated)));

        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        b.write_all(&frame(b"x", true)).await.unwrap();
        drop(b);
        assert!(matches!(message(&mut s).await, Err(ZmtpError::Truncated)), "a cut multipart message");

        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        b.write_all(&frame(b"x", false)).await.unwrap();
        drop(b);
        assert_eq!(message(&mut s).await.unwrap(), vec![b"x".to_vec()]);
        assert!(matches!(message(&mut s).await, Err(ZmtpError::Closed)));
    }

    #[tokio::test]
    async fn a_huge_announced_size_allocates_nothing() {
        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        let mut bytes = vec![FLAG_LONG];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&[5u8; 100]);
        b.write_all(&bytes).await.unwrap();
        let capacity = s.buf.len();
        s.fill().await.unwrap();
        assert_eq!(s.next_event().unwrap(), Some(Event::Start { len: u64::MAX, more: false }));
        assert_eq!(s.next_event().unwrap(), Some(Event::Data(&[5u8; 100][..])));
        assert_eq!(s.next_event().unwrap(), None);
        assert_eq!(s.buf.len(), capacity);
        drop(b);
        assert!(matches!(s.fill().await, Err(ZmtpError::Truncated)));
    }

    #[tokio::test]
    async fn the_read_buffer_grows_for_a_large_frame_and_shrinks_between_messages() {
        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        assert_eq!(s.buf.len(), MIN_READ_BUFFER, "a quiet connection holds the small buffer");
        let big = vec![4u8; 200_000];
        let writer = tokio::spawn(async move {
            b.write_all(&[frame(&big, true), frame(b"tail", false)].concat()).await.unwrap();
            b.write_all(&frame(b"next", false)).await.unwrap();
            b
        });
        let mut largest = 0;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        'message: loop {
            while let Some(event) = s.next_event().unwrap() {
                match event {
                    Event::Start { .. } => frames.push(Vec::new()),
                    Event::Data(d) => frames.last_mut().unwrap().extend_from_slice(d),
                    Event::End { more: false } => break 'message,
                    Event::End { more: true } => {}
                }
            }
            s.fill().await.unwrap();
            largest = largest.max(s.buf.len());
        }
        let lens: Vec<usize> = frames.iter().map(Vec::len).collect();
        assert_eq!(lens, [200_000, 4]);
        assert!(frames[0].iter().all(|&b| b == 4) && frames[1] == b"tail", "the frames' bytes arrive intact");
        assert_eq!(largest, READ_BUFFER, "reads that fill the buffer double it, up to the largest");
        let _b = writer.await.unwrap();
        assert_eq!(message(&mut s).await.unwrap(), vec![b"next".to_vec()]);
        // Waiting for the next message (the read is cancelled: nothing comes).
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), s.fill()).await;
        assert!(waiting.is_err());
        assert_eq!(s.buf.len(), MIN_READ_BUFFER, "a connection waiting between messages holds the small buffer");
    }

    #[tokio::test]
    async fn a_ready_larger_than_the_small_buffer_still_completes_the_handshake() {
        let (a, mut b) = duplex(1 << 16);
        let mut bytes = greeting().to_vec();
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        for (name, value) in [(&b"Socket-Type"[..], &b"ROUTER"[..]), (b"X-Padding", &[b'p'; 6000][..])] {
            body.push(name.len() as u8);
            body.extend_from_slice(name);
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        bytes.push(FLAG_COMMAND | FLAG_LONG);
        bytes.extend_from_slice(&(body.len() as u64).to_be_bytes());
        bytes.extend_from_slice(&body);
        b.write_all(&bytes).await.unwrap();
        assert!(ZmtpStream::handshake(a, SocketType::Dealer, None).await.is_ok());
    }

    #[tokio::test]
    async fn reserved_flags_and_commands_inside_messages_are_protocol_errors() {
        for bytes in [vec![0x08, 0], [frame(b"a", true), vec![0x04, 0]].concat(), vec![0x05, 0]] {
            let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
            b.write_all(&bytes).await.unwrap();
            assert!(matches!(message(&mut s).await, Err(ZmtpError::BadFrame(_))));
        }
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut s, mut b) = connected(SocketType::Dealer, b"ROUTER").await;
        // Nothing to read: the read is cancelled by the timeout.
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(20), s.fill()).await;
        assert!(cancelled.is_err());
        b.write_all(&frame(b"after", false)).await.unwrap();
        assert_eq!(message(&mut s).await.unwrap(), vec![b"after".to_vec()]);
    }

    #[tokio::test]
    async fn a_cancelled_flush_resumes_without_tearing_frames() {
        let (a, mut b) = duplex(64);
        let handshake = tokio::spawn(async move { ZmtpStream::handshake(a, SocketType::Dealer, None).await });
        b.write_all(&peer_handshake_bytes(b"ROUTER")).await.unwrap();
        let mut sink = vec![0u8; 64 + 2 + 1 + 5 + 1 + 11 + 4 + 6];
        b.read_exact(&mut sink).await.unwrap();
        let mut s = handshake.await.unwrap().unwrap();
        let big = vec![3u8; 10_000];
        s.queue_message(&[b"head", &big]);
        // The peer does not read: the flush cannot finish and is dropped.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), s.flush()).await.is_err());
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut chunk = [0u8; 4096];
            while all.len() < 6 + 9 + 10_000 {
                let n = b.read(&mut chunk).await.unwrap();
                all.extend_from_slice(&chunk[..n]);
            }
            all
        });
        s.flush().await.unwrap();
        let all = reader.await.unwrap();
        assert_eq!(all, [frame(b"head", true), frame(&big, false)].concat());
    }
}
