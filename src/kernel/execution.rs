//! Following one `execute_request`: which kernel messages belong to it, what each one does to the notebook
//! outputs, and when the execution is complete.
//!
//! Pure logic over [`Message`]s, so it is tested without a kernel. An execution is complete when both its
//! `execute_reply` (shell) and its `status: idle` (IOPub) have arrived: output may follow the reply. A
//! kernel's IOPub queue drops messages when a flood fills it, and the idle status may be one of them: the
//! session's task then ends the execution after a quiet spell following the reply ([`ExecutionTracker::idle_lost`]).
//!
//! This file is the state machine: it picks our messages, hands each output to the cap, holds the reply
//! and the idle status, and builds the [`Report`]. What is kept of the outputs and what it costs (the
//! output cap, displays sharing an id) is `cap.rs`'s, sizes as compact JSON are `json_size.rs`'s: this
//! file must not keep, replace or charge an output itself. Prompts for input are the session's task's
//! (`stdin.rs`).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::client::Channel;
use super::wire::Message;

mod cap;
mod json_size;

use cap::{Bundle, DisplayGroup, Slot};
pub use cap::{CAP_SLACK, ERROR_RESERVE};

/// A notebook output, in nbformat's shapes.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(tag = "output_type", rename_all = "snake_case")]
pub enum Output {
    Stream {
        /// `stdout` or `stderr`.
        name: String,
        text: String,
    },
    DisplayData {
        /// MIME type → data (base64 for binary types, as Jupyter sends them).
        #[schema(value_type = Object)]
        data: Map<String, Value>,
        #[schema(value_type = Object)]
        metadata: Map<String, Value>,
    },
    ExecuteResult {
        execution_count: Option<u64>,
        #[schema(value_type = Object)]
        data: Map<String, Value>,
        #[schema(value_type = Object)]
        metadata: Map<String, Value>,
    },
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
}

/// The `error` part of a failed execution.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ErrorInfo {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

/// How an execution ended, as far as the kernel is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok,
    Error,
    Aborted,
}

/// What an incoming message changed, for streaming to a client. Every event carries only content that
/// was kept within the cap.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new output, or more text for the last output when it is a stream of the same name.
    /// `display_id` names a display that [`Event::Updated`] may later replace.
    Output { output: Output, display_id: Option<String> },
    /// Every display shown with `display_id` now shows `output` (a `display_data`).
    Updated { display_id: String, output: Output },
    /// Outputs so far were cleared (`clear_output`).
    Cleared,
    /// The code waits for input (made by the session's task, not by the tracker; see `stdin.rs`).
    InputRequested(super::stdin::InputRequest),
}

/// What an execution leaves for its response; every part was counted against the cap.
#[derive(Debug, Default)]
pub struct Report {
    /// Status and execution count of the `execute_reply`, once it came.
    pub reply: Option<(ReplyStatus, Option<u64>)>,
    pub outputs: Vec<Output>,
    /// The stream outputs' text again, by name, within what was left of the cap (see `cap.rs`).
    pub stdout: String,
    pub stderr: String,
    /// `stdout` or `stderr` keeps only its beginning (`outputs` has the whole text).
    pub streams_abridged: bool,
    /// The first error output, or else the reply's error (see [`ERROR_RESERVE`]).
    pub error: Option<ErrorInfo>,
    /// Something was cut or dropped.
    pub truncated: bool,
}

/// The `execute_reply`, kept until the report.
#[derive(Debug)]
struct Reply {
    status: ReplyStatus,
    execution_count: Option<u64>,
    /// Already cut to the cap (it is one message; what is reported is decided at the end).
    error: Option<ErrorInfo>,
}

/// Follows one execution.
///
/// The output state (`slots`, `entries`, `displays`, `used`, `closed`, `clear_pending`) is written only by
/// the methods in `cap.rs`, so that nothing is kept without being charged.
#[derive(Debug)]
pub struct ExecutionTracker {
    /// The `msg_id` of our `execute_request`; messages with another parent are not ours.
    msg_id: String,
    slots: Vec<Slot>,
    /// Contents shared by the displays of one id, once updated; one entry per updated id.
    entries: Vec<Bundle>,
    /// `display_id` → the displays an update replaces.
    displays: HashMap<String, DisplayGroup>,
    /// The output cap, in bytes of JSON.
    cap: usize,
    /// Bytes charged for what is kept now (see `cap.rs`); never above `cap`.
    used: usize,
    /// A stream or error was cut with a marker: nothing more is kept until a clear.
    closed: bool,
    truncated: bool,
    /// `clear_output(wait=True)` clears on the next output, not now.
    clear_pending: bool,
    reply: Option<Reply>,
    idle_seen: bool,
}

impl ExecutionTracker {
    pub fn new(msg_id: String, output_cap: usize) -> Self {
        ExecutionTracker {
            msg_id,
            slots: Vec::new(),
            entries: Vec::new(),
            displays: HashMap::new(),
            cap: output_cap,
            used: 0,
            closed: false,
            truncated: false,
            clear_pending: false,
            reply: None,
            idle_seen: false,
        }
    }

    /// The `msg_id` of the `execute_request` this tracker follows.
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// Takes one message; returns what it changed. Messages for other requests are ignored.
    pub fn handle(&mut self, channel: Channel, msg: &Message) -> Vec<Event> {
        if msg.parent_msg_id() != Some(self.msg_id.as_str()) {
            return Vec::new();
        }
        if msg.dropped_bytes > 0 {
            self.truncated = true;
        }
        let c = &msg.content;
        // The kernel cut an output itself before sending it (the python images' extension does, see
        // `images/python_core/kernelbox_ipython.py`); believing it costs nothing: it only marks this one.
        if c.pointer("/metadata/kernelbox/truncated") == Some(&Value::Bool(true)) {
            self.truncated = true;
        }
        let display_id = c.pointer("/transient/display_id").and_then(Value::as_str);
        match (channel, msg.msg_type()) {
            (Channel::Shell, "execute_reply") => {
                let status = match c.get("status").and_then(Value::as_str) {
                    Some("ok") => ReplyStatus::Ok,
                    Some("aborted") => ReplyStatus::Aborted,
                    _ => ReplyStatus::Error,
                };
                let error = (status == ReplyStatus::Error).then(|| self.hold_reply_error(error_info(c)));
                let execution_count = c.get("execution_count").and_then(Value::as_u64);
                self.reply = Some(Reply { status, execution_count, error });
                Vec::new()
            }
            (Channel::IOPub, "status") => {
                if c.get("execution_state").and_then(Value::as_str) == Some("idle") {
                    self.idle_seen = true;
                }
                Vec::new()
            }
            (Channel::IOPub, "stream") => self.push_stream(str_field(c, "name"), str_field(c, "text")),
            (Channel::IOPub, "display_data") => {
                self.push_bundle(display_id, None, map_field(c, "data"), map_field(c, "metadata"))
            }
            (Channel::IOPub, "update_display_data") => match display_id {
                Some(id) => self.update(id, map_field(c, "data"), map_field(c, "metadata")),
                None => Vec::new(),
            },
            (Channel::IOPub, "execute_result") => {
                let count = c.get("execution_count").and_then(Value::as_u64);
                self.push_bundle(None, Some(count), map_field(c, "data"), map_field(c, "metadata"))
            }
            (Channel::IOPub, "error") => self.push_error(error_info(c)),
            (Channel::IOPub, "clear_output") => self.clear_output(c.get("wait").and_then(Value::as_bool) == Some(true)),
            _ => Vec::new(),
        }
    }

    /// Both the reply and the idle status have arrived.
    pub fn is_complete(&self) -> bool {
        self.reply.is_some() && self.idle_seen
    }

    /// The reply came but not (yet) the idle status: IOPub may still carry output.
    pub fn awaits_only_idle(&self) -> bool {
        self.reply.is_some() && !self.idle_seen
    }

    /// Completes an execution whose `status: idle` never came although its reply did: a kernel's IOPub
    /// queue drops messages when it is full (ZeroMQ's high-water mark), the idle status among them. What
    /// was dropped was output, so the execution is marked truncated.
    pub fn idle_lost(&mut self) {
        self.idle_seen = true;
        self.truncated = true;
    }

    /// The reply's status and execution count, once it came. Its error is in [`Self::into_report`].
    pub fn reply(&self) -> Option<(ReplyStatus, Option<u64>)> {
        self.reply.as_ref().map(|r| (r.status, r.execution_count))
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Everything the response carries: the outputs, the error to report (the first error output, or the
    /// reply's error within what is left of the budget, or else cut to [`ERROR_RESERVE`]), and then
    /// `stdout`/`stderr` within what is left after that.
    pub fn into_report(mut self) -> Report {
        let outputs = self.outputs();
        let error = first_error(&outputs).or_else(|| {
            let error = self.reply.as_mut()?.error.take()?;
            Some(self.report_reply_error(error))
        });
        let (stdout, stderr, streams_abridged) = self.stream_fields(&outputs);
        Report { reply: self.reply(), outputs, stdout, stderr, streams_abridged, error, truncated: self.truncated }
    }
}

/// Concatenated text of all stream outputs called `name`.
pub fn stream_text(outputs: &[Output], which: &str) -> String {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Stream { name, text } if name == which => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The first error output, if any.
pub fn first_error(outputs: &[Output]) -> Option<ErrorInfo> {
    outputs.iter().find_map(|o| match o {
        Output::Error { ename, evalue, traceback } => {
            Some(ErrorInfo { ename: ename.clone(), evalue: evalue.clone(), traceback: traceback.clone() })
        }
        _ => None,
    })
}

fn str_field(c: &Value, key: &str) -> String {
    match c.get(key) {
        Some(Value::String(s)) => s.clone(),
        // Some kernels send text as a list of lines.
        Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

fn map_field(c: &Value, key: &str) -> Map<String, Value> {
    c.get(key).and_then(Value::as_object).cloned().unwrap_or_default()
}

fn error_info(c: &Value) -> ErrorInfo {
    ErrorInfo {
        ename: str_field(c, "ename"),
        evalue: str_field(c, "evalue"),
        traceback: c
            .get("traceback")
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;
