//! The Jupyter wire format: one message as ZMTP frames, signed with HMAC-SHA256, read with bounded memory.
//!
//! A message on the wire is `[identities..., "<IDS|MSG>", signature, header, parent_header, metadata,
//! content, buffers...]`. The signature is the hex HMAC of the four JSON frames, in that order; buffers are
//! not signed (Jupyter messaging spec, "The Wire Protocol").
//!
//! Everything a kernel sends is attacker input: the kernel runs the user's code and knows the key. So a
//! message is assembled by [`MessageReader`] from the frame events of `zmtp.rs` as they stream past, and
//! nothing is buffered beyond [`WireLimits`]: the HMAC is computed incrementally over every byte, while
//! only a bounded prefix of each frame is kept. An oversize content frame keeps its first `max_message`
//! bytes (for `stream` messages the cut `text` is salvaged) and the message says how much was dropped
//! ([`Message::dropped_bytes`]), so the caller can report truncation; a message with a bad signature is
//! dropped whatever its size. What parsing allocates is bounded too: a content with more JSON values than
//! `max_content_values` keeps only the top-level members that fit. Reading what is left of a cut content
//! is `salvage.rs`'s; this module decides when, after the signature is checked. It knows nothing of
//! sockets, HTTP or Docker, so every malformed-frame case is a plain unit test.

use bytes::Bytes;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::salvage::{json_values, salvage};
use super::zmtp::Event;

/// The frame that separates routing identities from the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The Jupyter protocol version we speak.
pub const PROTOCOL_VERSION: &str = "5.3";

/// A hex HMAC-SHA256 is 64 bytes; longer signature frames are not read.
const MAX_SIGNATURE: usize = 128;

/// How much of a kernel's message is kept. Every limit bounds memory before anything is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Bytes kept of `content` plus `buffers`: a longer content frame keeps its prefix, buffers past the
    /// budget are dropped. Counted in [`Message::dropped_bytes`].
    pub max_message: usize,
    /// `header` and `parent_header` each; a longer one drops the message (they are small in every kernel).
    pub max_header: usize,
    /// A longer `metadata` frame is replaced by `{}` and counted as dropped.
    pub max_metadata: usize,
    /// Routing identities (IOPub topics) before the delimiter; more drops the message.
    pub max_identities: usize,
    /// The size of one identity frame; a longer one drops the message.
    pub max_identity_len: usize,
    /// Buffer frames after content; more drops the message.
    pub max_buffers: usize,
    /// JSON values in `content` (counted as its commas, colons and brackets outside strings): parsed JSON
    /// takes 32 to 64 bytes a value, so `[0,0,0,…]` would take 32 times its size. A content with more is
    /// treated like a cut one: only its top-level members that fit the count are kept.
    pub max_content_values: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits {
            max_message: 1024 * 1024,
            max_header: 64 * 1024,
            max_metadata: 64 * 1024,
            max_identities: 64,
            max_identity_len: 1024,
            max_buffers: 1024,
            max_content_values: 128 * 1024,
        }
    }
}

impl WireLimits {
    /// The smallest `max_message` [`WireLimits::for_output_cap`] gives.
    pub const MIN_MESSAGE: usize = 64 * 1024;

    /// Limits for a session whose outputs are capped at `output_cap` bytes: a message may carry all of the
    /// output shown plus room for its JSON.
    pub fn for_output_cap(output_cap: usize) -> Self {
        let max_message = output_cap.saturating_add(256 * 1024).max(Self::MIN_MESSAGE);
        // At most ~8 parsed bytes for each byte kept, even for a pathological content.
        WireLimits { max_message, max_content_values: max_message / 8, ..Self::default() }
    }
}

/// Why a multipart message could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message has no <IDS|MSG> delimiter frame")]
    NoDelimiter,
    #[error("message has {0} frames after the delimiter; a signature and four JSON frames are needed")]
    Truncated(usize),
    #[error("message signature does not match its content")]
    BadSignature,
    #[error("message frame `{frame}` is not valid JSON: {reason}")]
    BadJson { frame: &'static str, reason: String },
    #[error("message has more than {max} {what} frames")]
    TooManyFrames { what: &'static str, max: usize },
    #[error("message frame `{frame}` has {len} bytes, more than the {max} allowed")]
    FrameTooLarge { frame: &'static str, len: u64, max: usize },
}

/// A message header: the fields every kernel sends, and any others kept as they came (`subshell_id`, a
/// client's own), so a message relayed to or from a Jupyter client passes through unchanged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub msg_id: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    pub msg_type: String,
    #[serde(default)]
    pub version: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Header {
    /// A fresh header for a message we send.
    pub fn new(msg_type: &str, session: &str) -> Self {
        Header {
            msg_id: uuid::Uuid::new_v4().simple().to_string(),
            session: session.to_owned(),
            username: "kernelbox".to_owned(),
            date: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            msg_type: msg_type.to_owned(),
            version: PROTOCOL_VERSION.to_owned(),
            extra: serde_json::Map::new(),
        }
    }
}

/// One Jupyter message. `parent_header`, `metadata` and `content` stay raw JSON so nothing a kernel
/// sends is lost on the way through (unless it is over the [`WireLimits`]: see `dropped_bytes`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Routing identities before the delimiter (a topic on IOPub).
    pub identities: Vec<Bytes>,
    pub header: Header,
    /// The header of the request this message answers (`{}` when none).
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
    /// Bytes the kernel sent that are not in this message because they were over the limits (a cut
    /// content frame, dropped metadata or buffers); 0 when the message is whole.
    pub dropped_bytes: u64,
}

impl Message {
    /// A new request of `msg_type` with `content`, for the client session `session`.
    pub fn request(msg_type: &str, session: &str, content: Value) -> Self {
        Message {
            identities: Vec::new(),
            header: Header::new(msg_type, session),
            parent_header: Value::Object(Default::default()),
            metadata: Value::Object(Default::default()),
            content,
            buffers: Vec::new(),
            dropped_bytes: 0,
        }
    }

    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    /// The `msg_id` of the request this message answers, if any.
    pub fn parent_msg_id(&self) -> Option<&str> {
        self.parent_header.get("msg_id").and_then(Value::as_str)
    }
}

/// Signs outgoing and verifies incoming messages with the connection's key. An empty key disables
/// signing, as the spec allows (we never generate one).
#[derive(Clone)]
pub struct Signer {
    key: Option<hmac::Key>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("signed", &self.key.is_some()).finish()
    }
}

impl Signer {
    pub fn new(key: &str) -> Self {
        let key = (!key.is_empty()).then(|| hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()));
        Signer { key }
    }

    fn sign(&self, parts: &[&[u8]]) -> String {
        match &self.key {
            None => String::new(),
            Some(key) => {
                let mut ctx = hmac::Context::with_key(key);
                for part in parts {
                    ctx.update(part);
                }
                hex::encode(ctx.sign().as_ref())
            }
        }
    }

    /// The frames of `msg`, signed.
    pub fn encode(&self, msg: &Message) -> Vec<Bytes> {
        let header = serde_json::to_vec(&msg.header).expect("a header always serializes");
        let parent = serde_json::to_vec(&msg.parent_header).expect("JSON values always serialize");
        let metadata = serde_json::to_vec(&msg.metadata).expect("JSON values always serialize");
        let content = serde_json::to_vec(&msg.content).expect("JSON values always serialize");
        let signature = self.sign(&[&header, &parent, &metadata, &content]);
        let mut frames = Vec::with_capacity(msg.identities.len() + 6 + msg.buffers.len());
        frames.extend(msg.identities.iter().cloned());
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(Bytes::from(signature));
        frames.extend([header, parent, metadata, content].map(Bytes::from));
        frames.extend(msg.buffers.iter().cloned());
        frames
    }

    /// Reads a message from whole frames with the default limits (the fake kernel and tests; the client
    /// streams frames through a [`MessageReader`] instead).
    pub fn decode(&self, frames: Vec<Bytes>) -> Result<Message, WireError> {
        MessageReader::new(self.clone(), WireLimits::default()).decode_frames(&frames)
    }
}

/// Where the current frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Before the delimiter: an identity, or the delimiter itself.
    Identity,
    Signature,
    /// header, parent_header, metadata, content: signed.
    Json(usize),
    /// A buffer, kept whole (`true`) or dropped.
    Buffer(bool),
    /// The message is already rejected: skip to its end.
    Discard,
}

const JSON_FRAMES: [&str; 4] = ["header", "parent_header", "metadata", "content"];

/// Assembles messages from ZMTP frame events with bounded memory, verifying the signature as the bytes
/// stream past. Holds the partial message between events, so a reader that is cancelled between reads
/// loses nothing.
pub struct MessageReader {
    signer: Signer,
    limits: WireLimits,
    partial: Partial,
}

/// The message being read.
#[derive(Default)]
struct Partial {
    /// Frames after the delimiter so far; `None` until the delimiter.
    after_delimiter: Option<usize>,
    identities: Vec<Bytes>,
    slot: Option<Slot>,
    /// What is kept of the current frame (at most `keep` bytes).
    current: Vec<u8>,
    keep: usize,
    /// The HMAC of the JSON frames so far (when the connection is signed).
    mac: Option<hmac::Context>,
    signature: Vec<u8>,
    /// The signature frame was longer than any valid one.
    signature_too_long: bool,
    json: [Vec<u8>; 4],
    metadata_dropped: bool,
    content_cut: bool,
    buffers: Vec<Bytes>,
    /// Bytes of content and buffers kept, against `max_message`.
    kept: usize,
    dropped: u64,
    /// The first reason to reject the message; the rest of it is read and discarded.
    error: Option<WireError>,
}

impl MessageReader {
    pub fn new(signer: Signer, limits: WireLimits) -> Self {
        MessageReader { signer, limits, partial: Partial::default() }
    }

    /// Takes one frame event; returns the message (or why it is rejected) when its last frame ends.
    pub fn feed(&mut self, event: Event<'_>) -> Option<Result<Message, WireError>> {
        match event {
            Event::Start { len, .. } => {
                self.start_frame(len);
                None
            }
            Event::Data(chunk) => {
                let p = &mut self.partial;
                if let (Some(Slot::Json(_)), Some(mac)) = (p.slot, p.mac.as_mut()) {
                    mac.update(chunk);
                }
                let room = p.keep - p.current.len();
                p.current.extend_from_slice(&chunk[..chunk.len().min(room)]);
                None
            }
            Event::End { more } => {
                self.end_frame();
                (!more).then(|| self.finish())
            }
        }
    }

    /// Reads a message given as whole frames.
    pub fn decode_frames(&mut self, frames: &[Bytes]) -> Result<Message, WireError> {
        for (i, frame) in frames.iter().enumerate() {
            let more = i + 1 < frames.len();
            self.feed(Event::Start { len: frame.len() as u64, more });
            if !frame.is_empty() {
                self.feed(Event::Data(frame));
            }
            if let Some(result) = self.feed(Event::End { more }) {
                return result;
            }
        }
        self.partial = Partial::default();
        Err(WireError::NoDelimiter)
    }

    fn start_frame(&mut self, len: u64) {
        let limits = self.limits;
        let p = &mut self.partial;
        let fits = |max: usize| len <= max as u64;
        let (slot, keep) = if p.error.is_some() {
            (Slot::Discard, 0)
        } else {
            match p.after_delimiter {
                None if !fits(limits.max_identity_len) => {
                    p.error = Some(WireError::FrameTooLarge { frame: "identity", len, max: limits.max_identity_len });
                    (Slot::Discard, 0)
                }
                None => (Slot::Identity, len as usize),
                Some(0) => {
                    p.signature_too_long = !fits(MAX_SIGNATURE);
                    (Slot::Signature, (len as usize).min(MAX_SIGNATURE))
                }
                Some(n @ 1..=2) if !fits(limits.max_header) => {
                    let frame = JSON_FRAMES[n - 1];
                    p.error = Some(WireError::FrameTooLarge { frame, len, max: limits.max_header });
                    (Slot::Discard, 0)
                }
                Some(n @ 1..=2) => (Slot::Json(n - 1), len as usize),
                Some(3) if !fits(limits.max_metadata) => {
                    p.metadata_dropped = true;
                    p.dropped = p.dropped.saturating_add(len);
                    (Slot::Json(2), 0)
                }
                Some(3) => (Slot::Json(2), len as usize),
                Some(4) => {
                    let keep = len.min(limits.max_message as u64) as usize;
                    p.content_cut = len > keep as u64;
                    p.dropped = p.dropped.saturating_add(len - keep as u64);
                    p.kept = keep;
                    (Slot::Json(3), keep)
                }
                Some(_) if p.buffers.len() >= limits.max_buffers => {
                    p.error = Some(WireError::TooManyFrames { what: "buffer", max: limits.max_buffers });
                    (Slot::Discard, 0)
                }
                Some(_) if fits(limits.max_message - p.kept) => (Slot::Buffer(true), len as usize),
                Some(_) => {
                    p.dropped = p.dropped.saturating_add(len);
                    (Slot::Buffer(false), 0)
                }
            }
        };
        p.slot = Some(slot);
        p.keep = keep;
        // `keep` is bounded by the limits above, never by what the peer announced alone.
        p.current = Vec::with_capacity(keep);
    }

    fn end_frame(&mut self) {
        let p = &mut self.partial;
        let data = std::mem::take(&mut p.current);
        let slot = p.slot.take().unwrap_or(Slot::Discard);
        match slot {
            Slot::Identity if data == DELIMITER => {
                p.after_delimiter = Some(0);
                p.mac = self.signer.key.as_ref().map(hmac::Context::with_key);
                return;
            }
            Slot::Identity if p.identities.len() >= self.limits.max_identities => {
                p.error = Some(WireError::TooManyFrames { what: "identity", max: self.limits.max_identities });
            }
            Slot::Identity => p.identities.push(Bytes::from(data)),
            Slot::Signature => p.signature = data,
            Slot::Json(i) => p.json[i] = data,
            Slot::Buffer(true) => {
                p.kept += data.len();
                p.buffers.push(Bytes::from(data));
            }
            Slot::Buffer(false) | Slot::Discard => {}
        }
        if let Some(n) = p.after_delimiter.as_mut() {
            *n += 1;
        }
    }

    fn finish(&mut self) -> Result<Message, WireError> {
        let p = std::mem::take(&mut self.partial);
        if let Some(error) = p.error {
            return Err(error);
        }
        let frames = p.after_delimiter.ok_or(WireError::NoDelimiter)?;
        if frames < 5 {
            return Err(WireError::Truncated(frames));
        }
        if let Some(mac) = p.mac {
            let tag = mac.sign();
            let signature = hex::decode(&p.signature).map_err(|_| WireError::BadSignature)?;
            // Constant-time: a kernel must not learn the tag byte by byte.
            if p.signature_too_long || !bool::from(tag.as_ref().ct_eq(&signature)) {
                return Err(WireError::BadSignature);
            }
        }
        let [header, parent, metadata, content] = p.json;
        let header: Header = parse(&header, "header")?;
        let parent_header = parse(&parent, "parent_header")?;
        let metadata = if p.metadata_dropped { Value::Object(Map::new()) } else { parse(&metadata, "metadata")? };
        let max_values = self.limits.max_content_values;
        let mut dropped = p.dropped;
        let content = if p.content_cut {
            salvage(&header.msg_type, &content, max_values)
        } else if json_values(&content) > max_values {
            dropped = dropped.saturating_add(content.len() as u64);
            salvage(&header.msg_type, &content, max_values)
        } else {
            parse(&content, "content")?
        };
        Ok(Message {
            identities: p.identities,
            header,
            parent_header,
            metadata,
            content,
            buffers: p.buffers,
            dropped_bytes: dropped,
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(frame: &[u8], name: &'static str) -> Result<T, WireError> {
    serde_json::from_slice(frame).map_err(|e| WireError::BadJson { frame: name, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer() -> Signer {
        Signer::new("a-secret-key")
    }

    fn sample() -> Message {
        let mut msg = Message::request("execute_request", "s1", json!({"code": "1+1", "silent": false}));
        msg.identities = vec![Bytes::from_static(b"peer")];
        msg.buffers = vec![Bytes::from_static(b"\x00binary")];
        msg
    }

    #[test]
    fn a_message_survives_encode_and_decode() {
        let msg = sample();
        let decoded = signer().decode(signer().encode(&msg)).unwrap();
        assert_eq!(decoded, msg);
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256_of_the_four_json_frames() {
        let frames = signer().encode(&sample());
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"a-secret-key");
        let mut data = Vec::new();
        for f in &frames[3..7] {
            data.extend_from_slice(f);
        }
        assert_eq!(frames[2].as_ref(), hex::encode(hmac::sign(&key, &data).as_ref()).as_bytes());
    }

    #[test]
    fn a_message_without_delimiter_is_rejected() {
        let mut frames = signer().encode(&sample());
        frames.remove(1);
        assert_eq!(signer().decode(frames), Err(WireError::NoDelimiter));
    }

    #[test]
    fn a_truncated_message_is_rejected() {
        let mut frames = signer().encode(&sample());
        frames.truncate(5); // identity, delimiter, signature, header, parent
        assert_eq!(signer().decode(frames), Err(WireError::Truncated(3)));
        let only_delimiter = vec![Bytes::from_static(DELIMITER)];
        assert_eq!(signer().decode(only_delimiter), Err(WireError::Truncated(0)));
    }

    #[test]
    fn tampered_content_is_rejected() {
        let mut frames = signer().encode(&sample());
        frames[6] = Bytes::from_static(br#"{"code":"import os; os.system('rm -rf /')"}"#);
        assert_eq!(signer().decode(frames), Err(WireError::BadSignature));
    }

    #[test]
    fn a_message_signed_with_another_key_is_rejected() {
        let frames = Signer::new("other-key").encode(&sample());
        assert_eq!(signer().decode(frames), Err(WireError::BadSignature));
    }

    #[test]
    fn a_signature_that_is_not_hex_is_rejected() {
        let mut frames = signer().encode(&sample());
        frames[2] = Bytes::from_static(b"not hex at all");
        assert_eq!(signer().decode(frames), Err(WireError::BadSignature));
    }

    #[test]
    fn buffers_are_not_signed() {
        let mut frames = signer().encode(&sample());
        let last = frames.len() - 1;
        frames[last] = Bytes::from_static(b"other buffer");
        let msg = signer().decode(frames).unwrap();
        assert_eq!(msg.buffers, vec![Bytes::from_static(b"other buffer")]);
    }

    #[test]
    fn a_signed_frame_that_is_not_json_is_rejected_with_its_name() {
        let mut msg_frames = signer().encode(&sample());
        msg_frames[6] = Bytes::from_static(b"{not json");
        // Re-sign so that only the JSON is wrong.
        let sig = signer().sign(&[&msg_frames[3], &msg_frames[4], &msg_frames[5], &msg_frames[6]]);
        msg_frames[2] = Bytes::from(sig);
        match signer().decode(msg_frames) {
            Err(WireError::BadJson { frame: "content", .. }) => {}
            other => panic!("expected a content JSON error, got {other:?}"),
        }
    }

    #[test]
    fn a_header_without_msg_type_is_rejected() {
        let mut frames = signer().encode(&sample());
        frames[3] = Bytes::from_static(br#"{"msg_id":"x"}"#);
        let sig = signer().sign(&[&frames[3], &frames[4], &frames[5], &frames[6]]);
        frames[2] = Bytes::from(sig);
        assert!(matches!(signer().decode(frames), Err(WireError::BadJson { frame: "header", .. })));
    }

    #[test]
    fn an_unsigned_connection_accepts_an_empty_signature() {
        let unsigned = Signer::new("");
        let frames = unsigned.encode(&sample());
        assert!(frames[2].is_empty());
        assert!(unsigned.decode(frames).is_ok());
    }

    #[test]
    fn the_parent_msg_id_is_read_from_the_parent_header() {
        let mut msg = sample();
        msg.parent_header = json!({"msg_id": "abc", "msg_type": "execute_request"});
        assert_eq!(msg.parent_msg_id(), Some("abc"));
        assert_eq!(sample().parent_msg_id(), None);
    }

    fn limits(max_message: usize) -> WireLimits {
        WireLimits { max_message, ..WireLimits::default() }
    }

    fn read_with(limits: WireLimits, frames: &[Bytes]) -> Result<Message, WireError> {
        MessageReader::new(signer(), limits).decode_frames(frames)
    }

    /// Frames of a message with `content` given as raw bytes, signed with `signer`.
    fn raw_frames(signer: &Signer, msg_type: &str, content: &[u8]) -> Vec<Bytes> {
        let mut frames = signer.encode(&Message::request(msg_type, "k", json!({})));
        frames[5] = Bytes::copy_from_slice(content);
        frames[1] = Bytes::from(signer.sign(&[&frames[2], &frames[3], &frames[4], &frames[5]]));
        frames
    }

    #[test]
    fn limits_follow_the_output_cap_with_a_floor() {
        assert_eq!(WireLimits::for_output_cap(1024 * 1024).max_message, 1024 * 1024 + 256 * 1024);
        assert_eq!(WireLimits::for_output_cap(0).max_message, 256 * 1024);
        assert_eq!(WireLimits::for_output_cap(usize::MAX).max_message, usize::MAX);
        assert!(WireLimits::MIN_MESSAGE <= WireLimits::for_output_cap(0).max_message);
    }

    #[test]
    fn an_oversize_stream_keeps_a_prefix_of_its_text_and_counts_the_rest() {
        let text = "x".repeat(10_000);
        let content = serde_json::to_vec(&json!({"name": "stdout", "text": text})).unwrap();
        let msg = read_with(limits(1000), &raw_frames(&signer(), "stream", &content)).unwrap();
        let kept = msg.content["text"].as_str().unwrap();
        assert_eq!(msg.content["name"], "stdout");
        assert_eq!(kept.len(), 1000 - r#"{"name":"stdout","text":""#.len());
        assert_eq!(msg.dropped_bytes, content.len() as u64 - 1000);
        // A message within the limits is whole.
        let small = read_with(limits(1000), &raw_frames(&signer(), "stream", br#"{"name":"stdout","text":"hi"}"#));
        assert_eq!(small.unwrap().dropped_bytes, 0);
    }

    #[test]
    fn an_oversize_message_with_a_bad_signature_is_rejected() {
        let content = serde_json::to_vec(&json!({"name": "stdout", "text": "y".repeat(10_000)})).unwrap();
        let mut frames = raw_frames(&signer(), "stream", &content);
        let mut tampered = content.clone();
        *tampered.last_mut().unwrap() = b' '; // past the kept prefix
        frames[5] = Bytes::from(tampered);
        assert_eq!(read_with(limits(1000), &frames), Err(WireError::BadSignature));
        let frames = raw_frames(&Signer::new("other"), "stream", &content);
        assert_eq!(read_with(limits(1000), &frames), Err(WireError::BadSignature));
    }

    #[test]
    fn an_oversize_reply_keeps_its_complete_top_level_fields() {
        let content =
            format!(r#"{{"status": "ok", "execution_count": 7, "payload": [{{"data": "{}"}}]}}"#, "z".repeat(5000));
        let frames = raw_frames(&signer(), "execute_reply", content.as_bytes());
        let msg = read_with(limits(1000), &frames).unwrap();
        assert_eq!(msg.content, json!({"status": "ok", "execution_count": 7}));
        assert!(msg.dropped_bytes > 4000);
        // Other message types do not get a cut string.
        let frames = raw_frames(&signer(), "display_data", br#"{"data": {"text/plain": "aaaaaaaaaaaaaaaaaaaaaaa"}}"#);
        assert_eq!(read_with(limits(20), &frames).unwrap().content, json!({}));
    }

    #[test]
    fn a_huge_header_drops_the_message_and_huge_metadata_is_replaced() {
        let mut frames = signer().encode(&sample());
        frames[4] = Bytes::from(serde_json::to_vec(&json!({"pad": "p".repeat(70_000)})).unwrap());
        frames[2] = Bytes::from(signer().sign(&[&frames[3], &frames[4], &frames[5], &frames[6]]));
        assert!(matches!(signer().decode(frames), Err(WireError::FrameTooLarge { frame: "parent_header", .. })));

        let mut frames = signer().encode(&sample());
        frames[5] = Bytes::from(serde_json::to_vec(&json!({"pad": "p".repeat(70_000)})).unwrap());
        frames[2] = Bytes::from(signer().sign(&[&frames[3], &frames[4], &frames[5], &frames[6]]));
        let metadata_len = frames[5].len() as u64;
        let msg = signer().decode(frames).unwrap();
        assert_eq!(msg.metadata, json!({}));
        assert_eq!(msg.content, sample().content);
        assert_eq!(msg.dropped_bytes, metadata_len);
    }

    #[test]
    fn buffers_past_the_budget_are_dropped_and_counted() {
        let mut msg = sample();
        msg.content = json!({});
        msg.buffers = vec![Bytes::from(vec![1u8; 40]), Bytes::from(vec![2u8; 100]), Bytes::from(vec![3u8; 30])];
        let read = read_with(limits(80), &signer().encode(&msg)).unwrap();
        assert_eq!(read.buffers, vec![Bytes::from(vec![1u8; 40]), Bytes::from(vec![3u8; 30])]);
        assert_eq!(read.dropped_bytes, 100);
    }

    #[test]
    fn absurd_frame_counts_drop_the_message() {
        let mut msg = sample();
        msg.buffers = vec![Bytes::new(); 2000];
        assert_eq!(signer().decode(signer().encode(&msg)), Err(WireError::TooManyFrames { what: "buffer", max: 1024 }));
        let mut msg = sample();
        msg.identities = vec![Bytes::from_static(b"id"); 65];
        assert_eq!(signer().decode(signer().encode(&msg)), Err(WireError::TooManyFrames { what: "identity", max: 64 }));
        let mut msg = sample();
        msg.identities = vec![Bytes::from(vec![b'i'; 2000])];
        assert!(matches!(signer().decode(signer().encode(&msg)), Err(WireError::FrameTooLarge { .. })));
        // And the reader is ready for the next message.
        let mut reader = MessageReader::new(signer(), WireLimits::default());
        let mut msg = sample();
        msg.buffers = vec![Bytes::new(); 2000];
        assert!(reader.decode_frames(&signer().encode(&msg)).is_err());
        let msg = sample();
        assert_eq!(reader.decode_frames(&signer().encode(&msg)), Ok(msg));
    }

    #[test]
    fn a_message_fed_one_byte_at_a_time_is_the_same_message() {
        let msg = sample();
        let frames = signer().encode(&msg);
        let mut reader = MessageReader::new(signer(), WireLimits::default());
        let mut result = None;
        for (i, frame) in frames.iter().enumerate() {
            let more = i + 1 < frames.len();
            assert!(reader.feed(Event::Start { len: frame.len() as u64, more }).is_none());
            for byte in frame.chunks(1) {
                assert!(reader.feed(Event::Data(byte)).is_none());
            }
            result = reader.feed(Event::End { more });
        }
        assert_eq!(result, Some(Ok(msg)));
    }

    #[test]
    fn an_announced_size_of_u64_max_keeps_at_most_the_limit() {
        let frames = signer().encode(&sample());
        let mut reader = MessageReader::new(signer(), limits(4096));
        for frame in &frames[..6] {
            reader.feed(Event::Start { len: frame.len() as u64, more: true });
            reader.feed(Event::Data(frame));
            reader.feed(Event::End { more: true });
        }
        reader.feed(Event::Start { len: u64::MAX, more: false });
        for _ in 0..100 {
            reader.feed(Event::Data(&[b'b'; 1000]));
        }
        assert!(reader.partial.current.capacity() <= 4096);
        assert_eq!(reader.partial.current.len(), 4096);
        assert_eq!(reader.partial.dropped, u64::MAX - 4096);
    }

    #[test]
    fn a_content_with_too_many_values_keeps_only_what_fits() {
        let limits = WireLimits { max_content_values: 1000, ..WireLimits::default() };
        let zeros = format!("[{}0]", "0,".repeat(100_000));
        let content = format!(r#"{{"status": "ok", "execution_count": 3, "payload": {zeros}, "name": "x"}}"#);
        let msg = read_with(limits, &raw_frames(&signer(), "execute_reply", content.as_bytes())).unwrap();
        assert_eq!(msg.content, json!({"status": "ok", "execution_count": 3, "name": "x"}));
        assert_eq!(msg.dropped_bytes, content.len() as u64);
        let small = format!(r#"{{"data": [{}0]}}"#, "0,".repeat(900));
        let msg = read_with(limits, &raw_frames(&signer(), "display_data", small.as_bytes())).unwrap();
        assert_eq!((msg.content["data"].as_array().unwrap().len(), msg.dropped_bytes), (901, 0));
        // Brackets and commas inside strings are not values.
        assert_eq!(json_values(br#"{"a": "[,{:]", "b\\\"[": [1, 2]}"#), 7, "1 + brace + 2 colons + 2 commas + bracket");
    }
}
