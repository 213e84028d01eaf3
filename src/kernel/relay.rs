//! Jupyter messages to and from clients outside the service (the gateway's WebSocket): a kernel's message
//! serialized once, for every client that gets it, and a client's message checked before the service signs
//! it with the kernel's key and sends it on. The key never leaves the service: clients send unsigned
//! messages and get unsigned ones, as Jupyter's WebSocket protocols have it.
//!
//! Which client gets which message is the session's business (`session/peers.rs`); how a message is framed
//! on a WebSocket is the API's (`api/kernel_ws_codec.rs`). Nothing here knows of either.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::client::Channel;
use super::wire::{Header, Message};

/// The most buffers a client's message may carry (widgets send a few; the size is bounded by the caller's
/// frame limit).
pub const MAX_CLIENT_BUFFERS: usize = 64;

/// A kernel message on its way to clients: its channel, its four JSON parts serialized once, its buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Relayed {
    pub channel: Channel,
    pub msg_id: String,
    pub msg_type: String,
    pub header: Bytes,
    pub parent_header: Bytes,
    pub metadata: Bytes,
    pub content: Bytes,
    pub buffers: Vec<Bytes>,
}

impl Relayed {
    pub fn new(channel: Channel, msg: &Message) -> Relayed {
        let json = |v: &Value| Bytes::from(serde_json::to_vec(v).expect("JSON values always serialize"));
        Relayed {
            channel,
            msg_id: msg.header.msg_id.clone(),
            msg_type: msg.header.msg_type.clone(),
            header: Bytes::from(serde_json::to_vec(&msg.header).expect("a header always serializes")),
            parent_header: json(&msg.parent_header),
            metadata: json(&msg.metadata),
            content: json(&msg.content),
            buffers: msg.buffers.clone(),
        }
    }

    /// An IOPub `status` message of the service's own (`restarting`, `dead`), as Jupyter's server sends
    /// its clients when the kernel restarts or dies under them.
    pub fn status(state: &str) -> Relayed {
        let mut msg = Message::request("status", "kernelbox", json!({ "execution_state": state }));
        msg.header.username = "kernelbox".into();
        Relayed::new(Channel::IOPub, &msg)
    }

    /// Bytes it holds: what a client's queue is charged for it.
    pub fn size(&self) -> usize {
        self.header.len()
            + self.parent_header.len()
            + self.metadata.len()
            + self.content.len()
            + self.buffers.iter().map(Bytes::len).sum::<usize>()
    }
}

/// Why a client's message is not sent on.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RelayError {
    #[error("no such channel: {0:?} (shell, control and stdin take messages)")]
    UnknownChannel(String),
    #[error("messages cannot be sent on iopub")]
    IOPub,
    #[error("`{0}` is missing or not a JSON object")]
    NotAnObject(&'static str),
    #[error("the header is not a Jupyter header: {0}")]
    BadHeader(String),
    #[error("{0} buffers, more than the {MAX_CLIENT_BUFFERS} allowed")]
    TooManyBuffers(usize),
}

/// The channel a client names, if a client may send on it.
pub fn client_channel(name: &str) -> Result<Channel, RelayError> {
    match name {
        "shell" => Ok(Channel::Shell),
        "control" => Ok(Channel::Control),
        "stdin" => Ok(Channel::Stdin),
        "iopub" => Err(RelayError::IOPub),
        other => Err(RelayError::UnknownChannel(other.chars().take(64).collect())),
    }
}

/// A client's message from its four JSON parts and buffers. The header needs `msg_id` and `msg_type`
/// (strings); every other field, and the other parts, pass through as the client sent them.
pub fn client_message(
    header: Value,
    parent_header: Value,
    metadata: Value,
    content: Value,
    buffers: Vec<Bytes>,
) -> Result<Message, RelayError> {
    let object = |v: Value, name| match v {
        Value::Object(_) => Ok(v),
        // Some clients send `null` for an empty parent or metadata.
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(RelayError::NotAnObject(name)),
    };
    if !header.is_object() {
        return Err(RelayError::NotAnObject("header"));
    }
    let header: Header = serde_json::from_value(header).map_err(|e| RelayError::BadHeader(e.to_string()))?;
    if buffers.len() > MAX_CLIENT_BUFFERS {
        return Err(RelayError::TooManyBuffers(buffers.len()));
    }
    Ok(Message {
        identities: Vec::new(),
        header,
        parent_header: object(parent_header, "parent_header")?,
        metadata: object(metadata, "metadata")?,
        content: object(content, "content")?,
        buffers,
        dropped_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Value {
        json!({"msg_id": "m1", "msg_type": "execute_request", "session": "s1", "username": "u",
               "date": "2026-12-01T10:00:00.000000Z", "version": "5.3", "subshell_id": null, "x-custom": 7})
    }

    #[test]
    fn a_client_message_keeps_every_header_field_it_came_with() {
        let msg = client_message(header(), json!({}), json!({"m": 1}), json!({"code": "1"}), vec![]).unwrap();
        let back: Value = serde_json::from_slice(&Relayed::new(Channel::Shell, &msg).header).unwrap();
        assert_eq!(back, header());
    }

    #[test]
    fn a_client_message_needs_a_header_with_id_and_type_and_object_parts() {
        let no_type = json!({"msg_id": "m1", "session": "s"});
        assert!(matches!(
            client_message(no_type, json!({}), json!({}), json!({}), vec![]),
            Err(RelayError::BadHeader(_))
        ));
        assert_eq!(
            client_message(json!("h"), json!({}), json!({}), json!({}), vec![]),
            Err(RelayError::NotAnObject("header"))
        );
        assert_eq!(
            client_message(header(), json!({}), json!({}), json!([1]), vec![]),
            Err(RelayError::NotAnObject("content"))
        );
        let null_parent = client_message(header(), Value::Null, Value::Null, json!({}), vec![]).unwrap();
        assert_eq!(null_parent.parent_header, json!({}));
        let many = vec![Bytes::new(); MAX_CLIENT_BUFFERS + 1];
        assert_eq!(
            client_message(header(), json!({}), json!({}), json!({}), many),
            Err(RelayError::TooManyBuffers(MAX_CLIENT_BUFFERS + 1))
        );
    }

    #[test]
    fn clients_send_on_shell_control_and_stdin_only() {
        assert_eq!(client_channel("shell"), Ok(Channel::Shell));
        assert_eq!(client_channel("control"), Ok(Channel::Control));
        assert_eq!(client_channel("stdin"), Ok(Channel::Stdin));
        assert_eq!(client_channel("iopub"), Err(RelayError::IOPub));
        assert!(matches!(client_channel("hb"), Err(RelayError::UnknownChannel(_))));
    }

    #[test]
    fn a_relayed_message_knows_its_type_and_its_size() {
        let mut msg = Message::request("execute_reply", "k", json!({"status": "ok"}));
        msg.parent_header = json!({"msg_id": "req-1"});
        msg.buffers = vec![Bytes::from_static(b"0123456789")];
        let relayed = Relayed::new(Channel::Shell, &msg);
        assert_eq!(serde_json::from_slice::<Value>(&relayed.parent_header).unwrap(), json!({"msg_id": "req-1"}));
        assert_eq!(relayed.msg_type, "execute_reply");
        let json_len =
            relayed.header.len() + relayed.parent_header.len() + relayed.metadata.len() + relayed.content.len();
        assert_eq!(relayed.size(), json_len + 10);
        let status: Value = serde_json::from_slice(&Relayed::status("dead").content).unwrap();
        assert_eq!(status, json!({"execution_state": "dead"}));
    }
}
