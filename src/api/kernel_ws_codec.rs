//! How Jupyter messages are framed on the kernel WebSocket, both ways, in the two protocols Jupyter's
//! server speaks:
//!
//! - **legacy** (no subprotocol, the default): a text frame holding the message as JSON with its
//!   `channel`; a message with buffers goes as a binary frame: a big-endian `u32` count `n`, then `n`
//!   `u32` offsets, then the JSON message (without `buffers`) and the buffers, each starting at its offset;
//! - **`v1.kernel.websocket.jupyter.org`**: always binary: a little-endian `u64` count `n`, then `n` `u64`
//!   offsets, then the channel name, `header`, `parent_header`, `metadata`, `content` and the buffers, each
//!   from its offset to the next (the last to the end).
//!
//! Pure functions over bytes, so every malformed frame is a unit test. A frame from a client is attacker
//! input: offsets are checked against the frame before anything is sliced.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::kernel::relay::{self, RelayError, Relayed};
use crate::kernel::{Channel, Message};

/// The binary subprotocol's name, as clients offer it in `Sec-WebSocket-Protocol`.
pub const V1_PROTOCOL: &str = "v1.kernel.websocket.jupyter.org";

/// The framing a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Legacy,
    V1,
}

/// One WebSocket data frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Text(String),
    Binary(Bytes),
}

/// Why a client's frame is not a message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("not a JSON message: {0}")]
    NotJson(String),
    #[error("bad binary framing: {0}")]
    Framing(&'static str),
    #[error("the message has no `channel`")]
    NoChannel,
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// A kernel's message as a frame for a client.
pub fn encode(protocol: Protocol, msg: &Relayed) -> Frame {
    match protocol {
        Protocol::V1 => {
            let parts: Vec<&[u8]> =
                [msg.channel.name().as_bytes(), &msg.header, &msg.parent_header, &msg.metadata, &msg.content]
                    .into_iter()
                    .chain(msg.buffers.iter().map(|b| b.as_ref()))
                    .collect();
            Frame::Binary(join(&parts, 8, |out, n| out.put_u64_le(n as u64)))
        }
        Protocol::Legacy => {
            let json = legacy_json(msg, msg.buffers.is_empty());
            if msg.buffers.is_empty() {
                Frame::Text(json)
            } else {
                let parts: Vec<&[u8]> =
                    std::iter::once(json.as_bytes()).chain(msg.buffers.iter().map(|b| b.as_ref())).collect();
                Frame::Binary(join(&parts, 4, |out, n| out.put_u32(n as u32)))
            }
        }
    }
}

/// A client's frame as a message for the kernel, with the channel it goes on.
pub fn decode(frame: Frame) -> Result<(Channel, Message), CodecError> {
    match frame {
        // Either protocol: JSON text is the legacy form, which every client may send.
        Frame::Text(text) => from_json(text.as_bytes(), Vec::new()),
        Frame::Binary(bytes) => decode_binary(bytes),
    }
}

/// A binary frame: the v1 layout when the count and first offset agree with it (its first offset is
/// 8 × (count + 1), in little-endian), else the legacy one.
fn decode_binary(bytes: Bytes) -> Result<(Channel, Message), CodecError> {
    if let Some(parts) = split(&bytes, 8, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        && parts.len() >= 5
    {
        let channel = std::str::from_utf8(&parts[0]).map_err(|_| CodecError::Framing("the channel is not UTF-8"))?;
        let channel = relay::client_channel(channel)?;
        let json = |i: usize| -> Result<Value, CodecError> {
            serde_json::from_slice(&parts[i]).map_err(|e| CodecError::NotJson(e.to_string()))
        };
        let msg = relay::client_message(json(1)?, json(2)?, json(3)?, json(4)?, parts[5..].to_vec())?;
        return Ok((channel, msg));
    }
    let parts = split(&bytes, 4, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as u64)
        .ok_or(CodecError::Framing("the offsets do not describe the frame"))?;
    let (json, buffers) = parts.split_first().ok_or(CodecError::Framing("no parts"))?;
    from_json(json, buffers.to_vec())
}

/// A JSON message `{channel, header, parent_header, metadata, content}`; `buffers` inside it are ignored
/// (they travel as binary parts).
fn from_json(json: &[u8], buffers: Vec<Bytes>) -> Result<(Channel, Message), CodecError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| CodecError::NotJson(e.to_string()))?;
    let Value::Object(mut map) = value else { return Err(CodecError::NotJson("not an object".into())) };
    let channel = match map.remove("channel") {
        Some(Value::String(name)) => relay::client_channel(&name)?,
        _ => return Err(CodecError::NoChannel),
    };
    let mut take = |k: &str| map.remove(k).unwrap_or(Value::Null);
    let msg = relay::client_message(take("header"), take("parent_header"), take("metadata"), take("content"), buffers)?;
    Ok((channel, msg))
}

/// The legacy JSON form of a message, built from its serialized parts without parsing them again.
fn legacy_json(msg: &Relayed, with_buffers_key: bool) -> String {
    let str_of = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    let quoted = |s: &str| serde_json::to_string(s).expect("strings always serialize");
    let mut out = String::with_capacity(msg.size() + 160);
    out.push_str("{\"header\":");
    out.push_str(&str_of(&msg.header));
    out.push_str(",\"msg_id\":");
    out.push_str(&quoted(&msg.msg_id));
    out.push_str(",\"msg_type\":");
    out.push_str(&quoted(&msg.msg_type));
    out.push_str(",\"parent_header\":");
    out.push_str(&str_of(&msg.parent_header));
    out.push_str(",\"metadata\":");
    out.push_str(&str_of(&msg.metadata));
    out.push_str(",\"content\":");
    out.push_str(&str_of(&msg.content));
    if with_buffers_key {
        out.push_str(",\"buffers\":[]");
    }
    out.push_str(",\"channel\":");
    out.push_str(&quoted(msg.channel.name()));
    out.push('}');
    out
}

/// `count, offsets..., parts...` with `width`-byte integers written by `put`. v1 counts one offset more
/// than it has parts (the end); legacy counts exactly its parts.
fn join(parts: &[&[u8]], width: usize, put: impl Fn(&mut BytesMut, usize)) -> Bytes {
    let v1 = width == 8;
    let offsets = if v1 { parts.len() + 1 } else { parts.len() };
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(width * (offsets + 1) + body);
    put(&mut out, offsets);
    let mut at = width * (offsets + 1);
    for part in parts {
        put(&mut out, at);
        at += part.len();
    }
    if v1 {
        put(&mut out, at);
    }
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

/// The parts of a `count, offsets..., parts...` frame (the inverse of [`join`] for its width), or `None`
/// when the offsets do not describe this frame: out of order, out of bounds, or the first one not right
/// after the offsets.
fn split(bytes: &Bytes, width: usize, read: impl Fn(&[u8]) -> u64) -> Option<Vec<Bytes>> {
    let v1 = width == 8;
    let count = read(bytes.get(..width)?);
    // Each offset takes `width` bytes of the frame: a count the frame cannot hold is not read.
    if count == 0 || count > (bytes.len() / width) as u64 {
        return None;
    }
    let count = count as usize;
    let mut offsets = Vec::with_capacity(count + 1);
    for i in 0..count {
        let at = width * (i + 1);
        offsets.push(usize::try_from(read(bytes.get(at..at + width)?)).ok()?);
    }
    if offsets[0] != width * (count + 1) {
        return None;
    }
    if !v1 {
        offsets.push(bytes.len());
    } else if *offsets.last()? != bytes.len() {
        return None;
    }
    let mut parts = Vec::with_capacity(offsets.len() - 1);
    for pair in offsets.windows(2) {
        if pair[0] > pair[1] || pair[1] > bytes.len() {
            return None;
        }
        parts.push(bytes.slice(pair[0]..pair[1]));
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kernel_message(buffers: Vec<Bytes>) -> Relayed {
        let mut msg = Message::request("comm_msg", "kernel", json!({"comm_id": "c", "data": {"x": "é\"q"}}));
        msg.parent_header = json!({"msg_id": "req"});
        msg.buffers = buffers;
        Relayed::new(Channel::IOPub, &msg)
    }

    fn client_json() -> Value {
        json!({
            "channel": "shell",
            "header": {"msg_id": "m1", "msg_type": "execute_request", "session": "s", "username": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": {"code": "1+1"}, "buffers": []
        })
    }

    #[test]
    fn legacy_text_carries_the_parts_unchanged_with_channel_and_ids() {
        let msg = kernel_message(vec![]);
        let Frame::Text(text) = encode(Protocol::Legacy, &msg) else { panic!("text expected") };
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["channel"], "iopub");
        assert_eq!(v["msg_type"], "comm_msg");
        assert_eq!(v["msg_id"], v["header"]["msg_id"]);
        assert_eq!(v["content"], json!({"comm_id": "c", "data": {"x": "é\"q"}}));
        assert_eq!(v["parent_header"], json!({"msg_id": "req"}));
        assert_eq!(v["buffers"], json!([]));
    }

    #[test]
    fn legacy_binary_carries_buffers_after_big_endian_offsets() {
        let msg = kernel_message(vec![Bytes::from_static(b"\x00\x01\x02"), Bytes::from_static(b"tail")]);
        let Frame::Binary(bin) = encode(Protocol::Legacy, &msg) else { panic!("binary expected") };
        assert_eq!(&bin[..4], &3u32.to_be_bytes());
        assert_eq!(&bin[4..8], &16u32.to_be_bytes(), "the JSON starts right after count and three offsets");
        assert!(bin.ends_with(b"\x00\x01\x02tail"));
        let parts = split(&bin, 4, |b| u32::from_be_bytes(b.try_into().unwrap()) as u64).unwrap();
        let v: Value = serde_json::from_slice(&parts[0]).unwrap();
        assert_eq!(v["channel"], "iopub");
        assert!(v.get("buffers").is_none(), "buffers travel as parts");
        assert_eq!(parts[1..], [Bytes::from_static(b"\x00\x01\x02"), Bytes::from_static(b"tail")]);
    }

    #[test]
    fn v1_frames_are_little_endian_offsets_then_channel_and_the_raw_parts() {
        let msg = kernel_message(vec![Bytes::from_static(b"BUF")]);
        let Frame::Binary(bin) = encode(Protocol::V1, &msg) else { panic!("binary expected") };
        assert_eq!(u64::from_le_bytes(bin[..8].try_into().unwrap()), 7, "channel + 4 parts + 1 buffer, and the end");
        let parts = split(&bin, 8, |b| u64::from_le_bytes(b.try_into().unwrap())).unwrap();
        assert_eq!(parts[0], "iopub");
        assert_eq!(parts[1], msg.header);
        assert_eq!(parts[4], msg.content);
        assert_eq!(parts[5], "BUF");
    }

    #[test]
    fn a_client_message_decodes_from_every_form() {
        let (channel, msg) = decode(Frame::Text(client_json().to_string())).unwrap();
        assert_eq!(channel, Channel::Shell);
        assert_eq!(msg.header.msg_id, "m1");
        assert_eq!(msg.content, json!({"code": "1+1"}));

        // v1, as JupyterLab sends it, with a buffer.
        let header = br#"{"msg_id":"m2","msg_type":"comm_msg","session":"s"}"#;
        let parts: Vec<&[u8]> = vec![b"shell", header, b"{}", b"{}", br#"{"data":{}}"#, b"BYTES"];
        let (channel, msg) = decode(Frame::Binary(join(&parts, 8, |o, n| o.put_u64_le(n as u64)))).unwrap();
        assert_eq!((channel, msg.header.msg_id.as_str()), (Channel::Shell, "m2"));
        assert_eq!(msg.buffers, [Bytes::from_static(b"BYTES")]);

        // Legacy binary, with a buffer.
        let json = client_json().to_string();
        let parts: Vec<&[u8]> = vec![json.as_bytes(), b"RAW"];
        let (_, msg) = decode(Frame::Binary(join(&parts, 4, |o, n| o.put_u32(n as u32)))).unwrap();
        assert_eq!(msg.buffers, [Bytes::from_static(b"RAW")]);
    }

    #[test]
    fn what_a_client_sends_round_trips_through_v1_unchanged() {
        let (_, msg) = decode(Frame::Text(client_json().to_string())).unwrap();
        let relayed = Relayed::new(Channel::Shell, &msg);
        let Frame::Binary(bin) = encode(Protocol::V1, &relayed) else { panic!() };
        let (channel, again) = decode(Frame::Binary(bin)).unwrap();
        assert_eq!((channel, again), (Channel::Shell, msg));
    }

    #[test]
    fn malformed_frames_are_errors_never_panics() {
        let bad = |frame: Frame| decode(frame).unwrap_err();
        assert!(matches!(bad(Frame::Text("{".into())), CodecError::NotJson(_)));
        assert!(matches!(bad(Frame::Text("[1]".into())), CodecError::NotJson(_)));
        assert_eq!(bad(Frame::Text(r#"{"header": {}}"#.into())), CodecError::NoChannel);
        let mut iopub = client_json();
        iopub["channel"] = json!("iopub");
        assert_eq!(bad(Frame::Text(iopub.to_string())), CodecError::Relay(RelayError::IOPub));
        for bytes in [
            &b""[..],
            b"\x00\x00\x00",
            b"\xff\xff\xff\xff\x00\x00\x00\x08",
            b"\x00\x00\x00\x01\xff\xff\xff\xff",
            b"\x00\x00\x00\x02\x00\x00\x00\x0c\x00\x00\x00\x01{}",
            b"\x02\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00",
        ] {
            let err = bad(Frame::Binary(Bytes::copy_from_slice(bytes)));
            assert!(matches!(err, CodecError::Framing(_) | CodecError::NotJson(_)), "{bytes:?}: {err:?}");
        }
    }
}
