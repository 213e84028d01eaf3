//! Following one `execute_request`: which kernel messages belong to it, the notebook outputs they make,
//! the output cap, and when the execution is complete.
//!
//! Pure logic over [`Message`]s, so it is tested without a kernel. An execution is complete when both its
//! `execute_reply` (shell) and its `status: idle` (IOPub) have arrived: output may follow the reply.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::client::Channel;
use super::wire::Message;

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

/// What an incoming message changed, for streaming to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new output (already capped).
    Output(Output),
    /// Outputs so far were cleared (`clear_output`).
    Cleared,
}

/// Follows one execution.
#[derive(Debug)]
pub struct ExecutionTracker {
    /// The `msg_id` of our `execute_request`; messages with another parent are not ours.
    msg_id: String,
    outputs: Vec<Output>,
    /// Bytes of output still allowed.
    budget: usize,
    /// The cap, kept for the truncation marker.
    cap: usize,
    truncated: bool,
    /// `clear_output(wait=True)` clears on the next output, not now.
    clear_pending: bool,
    /// `display_id` → indices of the outputs `update_display_data` may replace.
    displays: Vec<(String, usize)>,
    reply: Option<(ReplyStatus, Option<u64>, Option<ErrorInfo>)>,
    idle_seen: bool,
}

impl ExecutionTracker {
    pub fn new(msg_id: String, output_cap: usize) -> Self {
        ExecutionTracker {
            msg_id,
            outputs: Vec::new(),
            budget: output_cap,
            cap: output_cap,
            truncated: false,
            clear_pending: false,
            displays: Vec::new(),
            reply: None,
            idle_seen: false,
        }
    }

    /// Takes one message; returns what it changed. Messages for other requests are ignored.
    pub fn handle(&mut self, channel: Channel, msg: &Message) -> Vec<Event> {
        if msg.parent_msg_id() != Some(self.msg_id.as_str()) {
            return Vec::new();
        }
        let c = &msg.content;
        match (channel, msg.msg_type()) {
            (Channel::Shell, "execute_reply") => {
                let status = match c.get("status").and_then(Value::as_str) {
                    Some("ok") => ReplyStatus::Ok,
                    Some("aborted") => ReplyStatus::Aborted,
                    _ => ReplyStatus::Error,
                };
                let error = (status == ReplyStatus::Error).then(|| error_info(c));
                self.reply = Some((status, c.get("execution_count").and_then(Value::as_u64), error));
                Vec::new()
            }
            (Channel::IOPub, "status") => {
                if c.get("execution_state").and_then(Value::as_str) == Some("idle") {
                    self.idle_seen = true;
                }
                Vec::new()
            }
            (Channel::IOPub, "stream") => {
                let name = str_field(c, "name");
                let text = str_field(c, "text");
                self.push(Output::Stream { name, text })
            }
            (Channel::IOPub, "display_data") => {
                let (data, metadata) = (map_field(c, "data"), map_field(c, "metadata"));
                if let Some(id) = c.pointer("/transient/display_id").and_then(Value::as_str) {
                    self.displays.push((id.to_owned(), self.outputs.len()));
                }
                self.push(Output::DisplayData { data, metadata })
            }
            (Channel::IOPub, "update_display_data") => {
                let Some(id) = c.pointer("/transient/display_id").and_then(Value::as_str) else {
                    return Vec::new();
                };
                let (data, metadata) = (map_field(c, "data"), map_field(c, "metadata"));
                let targets: Vec<usize> = self.displays.iter().filter(|(d, _)| d == id).map(|(_, i)| *i).collect();
                for i in targets {
                    if let Some(Output::DisplayData { data: d, metadata: m }) = self.outputs.get_mut(i) {
                        *d = data.clone();
                        *m = metadata.clone();
                    }
                }
                Vec::new()
            }
            (Channel::IOPub, "execute_result") => {
                let execution_count = c.get("execution_count").and_then(Value::as_u64);
                let (data, metadata) = (map_field(c, "data"), map_field(c, "metadata"));
                self.push(Output::ExecuteResult { execution_count, data, metadata })
            }
            (Channel::IOPub, "error") => {
                let e = error_info(c);
                self.push(Output::Error { ename: e.ename, evalue: e.evalue, traceback: e.traceback })
            }
            (Channel::IOPub, "clear_output") => {
                if c.get("wait").and_then(Value::as_bool) == Some(true) {
                    self.clear_pending = true;
                    Vec::new()
                } else {
                    self.clear()
                }
            }
            _ => Vec::new(),
        }
    }

    fn clear(&mut self) -> Vec<Event> {
        self.outputs.clear();
        self.displays.clear();
        self.clear_pending = false;
        vec![Event::Cleared]
    }

    fn push(&mut self, output: Output) -> Vec<Event> {
        let mut events = if self.clear_pending { self.clear() } else { Vec::new() };
        let Some(output) = self.cap_output(output) else {
            return events;
        };
        // Consecutive stream output of one name is one output, as a notebook shows it.
        if let (Output::Stream { name, text }, Some(Output::Stream { name: last_name, text: last_text })) =
            (&output, self.outputs.last_mut())
            && name == last_name
        {
            last_text.push_str(text);
        } else {
            self.outputs.push(output.clone());
        }
        events.push(Event::Output(output));
        events
    }

    /// Fits `output` into what is left of the budget: text is cut at the cap with a marker, rich data that
    /// does not fit is dropped (its MIME types named in the marker). `None` once nothing more is shown.
    fn cap_output(&mut self, output: Output) -> Option<Output> {
        if self.budget == 0 {
            self.truncated = true;
            return None;
        }
        let marker = |cap: usize| format!("\n[kernelbox: output truncated, limit of {cap} bytes reached]\n");
        let capped = match output {
            Output::Stream { name, mut text } => {
                if text.len() > self.budget {
                    truncate_at_char(&mut text, self.budget);
                    text.push_str(&marker(self.cap));
                    self.budget = 0;
                    self.truncated = true;
                } else {
                    self.budget -= text.len();
                }
                Output::Stream { name, text }
            }
            Output::DisplayData { data, metadata } => {
                let (data, metadata) = self.cap_bundle(data, metadata);
                Output::DisplayData { data, metadata }
            }
            Output::ExecuteResult { execution_count, data, metadata } => {
                let (data, metadata) = self.cap_bundle(data, metadata);
                Output::ExecuteResult { execution_count, data, metadata }
            }
            Output::Error { ename, evalue, mut traceback } => {
                let size: usize = ename.len() + evalue.len() + traceback.iter().map(String::len).sum::<usize>();
                if size > self.budget {
                    traceback.truncate(1);
                    traceback.push(marker(self.cap));
                    self.truncated = true;
                }
                self.budget = self.budget.saturating_sub(size);
                Output::Error { ename, evalue, traceback }
            }
        };
        Some(capped)
    }

    fn cap_bundle(
        &mut self,
        mut data: Map<String, Value>,
        mut metadata: Map<String, Value>,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let mut omitted = Vec::new();
        let mut mimes: Vec<String> = data.keys().cloned().collect();
        // Keep text/plain first so a dropped image still leaves its textual form.
        mimes.sort_by_key(|m| m != "text/plain");
        for mime in mimes {
            let size = value_size(&data[&mime]);
            if size <= self.budget {
                self.budget -= size;
            } else {
                data.remove(&mime);
                omitted.push(mime);
            }
        }
        if !omitted.is_empty() {
            self.truncated = true;
            let note =
                format!("[kernelbox: output omitted ({}), limit of {} bytes reached]", omitted.join(", "), self.cap);
            data.entry("text/plain").or_insert_with(|| Value::String(note.clone()));
            metadata.insert("kernelbox".into(), json!({"truncated": true, "omitted": omitted, "message": note}));
        }
        (data, metadata)
    }

    /// Both the reply and the idle status have arrived.
    pub fn is_complete(&self) -> bool {
        self.reply.is_some() && self.idle_seen
    }

    /// The reply, once it came: status, execution count, error.
    pub fn reply(&self) -> Option<&(ReplyStatus, Option<u64>, Option<ErrorInfo>)> {
        self.reply.as_ref()
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The outputs so far, and whether any were cut.
    pub fn into_outputs(self) -> Vec<Output> {
        self.outputs
    }

    pub fn outputs(&self) -> &[Output] {
        &self.outputs
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

fn truncate_at_char(text: &mut String, max: usize) {
    let mut cut = max.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
}

fn value_size(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
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
mod tests {
    use super::*;

    const ID: &str = "req-1";

    fn msg(msg_type: &str, parent: &str, content: Value) -> Message {
        let mut m = Message::request(msg_type, "kernel", content);
        m.parent_header = json!({"msg_id": parent});
        m
    }

    fn feed(t: &mut ExecutionTracker, channel: Channel, msg_type: &str, content: Value) -> Vec<Event> {
        t.handle(channel, &msg(msg_type, ID, content))
    }

    fn tracker() -> ExecutionTracker {
        ExecutionTracker::new(ID.into(), 1024)
    }

    #[test]
    fn an_execution_is_complete_only_after_reply_and_idle() {
        let mut t = tracker();
        feed(&mut t, Channel::IOPub, "status", json!({"execution_state": "busy"}));
        feed(&mut t, Channel::Shell, "execute_reply", json!({"status": "ok", "execution_count": 3}));
        assert!(!t.is_complete());
        feed(&mut t, Channel::IOPub, "status", json!({"execution_state": "idle"}));
        assert!(t.is_complete());
        assert_eq!(t.reply().unwrap().0, ReplyStatus::Ok);
        assert_eq!(t.reply().unwrap().1, Some(3));
    }

    #[test]
    fn messages_for_other_requests_are_ignored() {
        let mut t = tracker();
        let other = msg("stream", "someone-else", json!({"name": "stdout", "text": "x"}));
        assert!(t.handle(Channel::IOPub, &other).is_empty());
        assert!(t.outputs().is_empty());
    }

    #[test]
    fn consecutive_stream_text_is_merged_and_split_by_name() {
        let mut t = tracker();
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "4"}));
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "2\n"}));
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stderr", "text": "warn\n"}));
        let out = t.into_outputs();
        assert_eq!(out.len(), 2);
        assert_eq!(stream_text(&out, "stdout"), "42\n");
        assert_eq!(stream_text(&out, "stderr"), "warn\n");
    }

    #[test]
    fn rich_results_keep_their_whole_mime_bundle() {
        let mut t = tracker();
        let data = json!({"text/plain": "2", "text/html": "<b>2</b>", "application/json": {"v": 2}});
        feed(&mut t, Channel::IOPub, "execute_result", json!({"execution_count": 1, "data": data, "metadata": {}}));
        match &t.outputs()[0] {
            Output::ExecuteResult { execution_count, data: d, .. } => {
                assert_eq!(*execution_count, Some(1));
                assert_eq!(Value::Object(d.clone()), data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_error_reply_carries_the_error() {
        let mut t = tracker();
        let err =
            json!({"status": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": ["tb"]});
        feed(&mut t, Channel::Shell, "execute_reply", err);
        let (status, _, error) = t.reply().unwrap();
        assert_eq!(*status, ReplyStatus::Error);
        assert_eq!(error.as_ref().unwrap().ename, "ZeroDivisionError");
    }

    #[test]
    fn stream_text_past_the_cap_is_cut_with_a_marker_and_then_dropped() {
        let mut t = ExecutionTracker::new(ID.into(), 10);
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "0123456789abcdef"}));
        let more = feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "more"}));
        assert!(more.is_empty());
        assert!(t.truncated());
        let text = stream_text(t.outputs(), "stdout");
        assert!(text.starts_with("0123456789\n[kernelbox: output truncated"), "{text}");
        assert!(!text.contains("more"));
    }

    #[test]
    fn the_cap_never_splits_a_character() {
        let mut t = ExecutionTracker::new(ID.into(), 5);
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "ééé"}));
        assert!(stream_text(t.outputs(), "stdout").starts_with("éé\n"));
    }

    #[test]
    fn an_image_past_the_cap_is_omitted_and_its_text_kept() {
        let mut t = ExecutionTracker::new(ID.into(), 100);
        let png = "A".repeat(500);
        feed(
            &mut t,
            Channel::IOPub,
            "display_data",
            json!({"data": {"image/png": png, "text/plain": "<Figure>"}, "metadata": {}}),
        );
        match &t.outputs()[0] {
            Output::DisplayData { data, metadata } => {
                assert!(!data.contains_key("image/png"));
                assert_eq!(data["text/plain"], "<Figure>");
                assert_eq!(metadata["kernelbox"]["omitted"], json!(["image/png"]));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.truncated());
    }

    #[test]
    fn clear_output_clears_now_or_at_the_next_output() {
        let mut t = tracker();
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "a"}));
        assert_eq!(feed(&mut t, Channel::IOPub, "clear_output", json!({"wait": false})), vec![Event::Cleared]);
        assert!(t.outputs().is_empty());
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "b"}));
        feed(&mut t, Channel::IOPub, "clear_output", json!({"wait": true}));
        assert_eq!(t.outputs().len(), 1);
        let events = feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "c"}));
        assert_eq!(events[0], Event::Cleared);
        assert_eq!(stream_text(t.outputs(), "stdout"), "c");
    }

    #[test]
    fn update_display_data_replaces_the_display_it_names() {
        let mut t = tracker();
        let first = json!({"data": {"text/plain": "0%"}, "metadata": {}, "transient": {"display_id": "p"}});
        feed(&mut t, Channel::IOPub, "display_data", first);
        let update = json!({"data": {"text/plain": "100%"}, "metadata": {}, "transient": {"display_id": "p"}});
        feed(&mut t, Channel::IOPub, "update_display_data", update);
        match &t.outputs()[0] {
            Output::DisplayData { data, .. } => assert_eq!(data["text/plain"], "100%"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn outputs_serialize_in_nbformat_shape() {
        let o = Output::Stream { name: "stdout".into(), text: "hi".into() };
        assert_eq!(serde_json::to_value(&o).unwrap(), json!({"output_type": "stream", "name": "stdout", "text": "hi"}));
    }
}
