//! The Jupyter wire format: one message as ZeroMQ frames, signed with HMAC-SHA256.
//!
//! A message on the wire is `[identities..., "<IDS|MSG>", signature, header, parent_header, metadata,
//! content, buffers...]`. The signature is the hex HMAC of the four JSON frames, in that order; buffers are
//! not signed (Jupyter messaging spec, "The Wire Protocol"). This module only turns frames into a
//! [`Message`] and back: it knows nothing of sockets, HTTP or Docker, so every malformed-frame case is a
//! plain unit test.

use bytes::Bytes;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The frame that separates routing identities from the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// The Jupyter protocol version we speak.
pub const PROTOCOL_VERSION: &str = "5.3";

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
}

/// A message header (the fields every kernel sends; unknown ones are ignored).
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
        }
    }
}

/// One Jupyter message. `parent_header`, `metadata` and `content` stay raw JSON so nothing a kernel
/// sends is lost on the way through.
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
    /// Bytes the wire layer dropped from an oversize message (0 when it arrived whole), e.g. a stream
    /// message whose text was cut to a prefix. An execution that sees one reports `truncated`.
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

    fn verify(&self, signature: &[u8], parts: &[&[u8]]) -> Result<(), WireError> {
        let Some(key) = &self.key else { return Ok(()) };
        let tag = hex::decode(signature).map_err(|_| WireError::BadSignature)?;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            data.extend_from_slice(part);
        }
        // `hmac::verify` compares in constant time.
        hmac::verify(key, &data, &tag).map_err(|_| WireError::BadSignature)
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

    /// Reads a message from its frames, checking the signature before parsing any JSON.
    pub fn decode(&self, frames: Vec<Bytes>) -> Result<Message, WireError> {
        let split = frames.iter().position(|f| f.as_ref() == DELIMITER).ok_or(WireError::NoDelimiter)?;
        let mut frames = frames.into_iter();
        let identities: Vec<Bytes> = frames.by_ref().take(split).collect();
        frames.next(); // the delimiter
        let rest: Vec<Bytes> = frames.collect();
        if rest.len() < 5 {
            return Err(WireError::Truncated(rest.len()));
        }
        self.verify(&rest[0], &[&rest[1], &rest[2], &rest[3], &rest[4]])?;
        let header: Header = parse(&rest[1], "header")?;
        Ok(Message {
            identities,
            header,
            parent_header: parse(&rest[2], "parent_header")?,
            metadata: parse(&rest[3], "metadata")?,
            content: parse(&rest[4], "content")?,
            buffers: rest[5..].to_vec(),
            dropped_bytes: 0,
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
}
