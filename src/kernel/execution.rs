//! Following one `execute_request`: which kernel messages belong to it, the notebook outputs they make,
//! the output cap, and when the execution is complete.
//!
//! Pure logic over [`Message`]s, so it is tested without a kernel. An execution is complete when both its
//! `execute_reply` (shell) and its `status: idle` (IOPub) have arrived: output may follow the reply. A
//! kernel's IOPub queue drops messages when a flood fills it, and the idle status may be one of them: the
//! session's task then ends the execution after a quiet spell following the reply ([`ExecutionTracker::idle_lost`]).
//!
//! # The output cap
//!
//! The cap bounds what the response carries, measured as compact JSON (strings with their escapes, as
//! `serde_json` writes them). Every byte kept is charged when it is kept:
//!
//! - each new output is charged its whole serialized size plus one byte (the separator in the array), so
//!   even an empty bundle costs its skeleton (about 50 bytes) and the number of outputs is bounded;
//! - stream text and error outputs are charged twice, because the response carries them twice (stream text
//!   also in `stdout`/`stderr`, the first error also as `error`);
//! - `display_data` and `execute_result` are charged data *and* metadata; a bundle that does not fit keeps
//!   the MIME types that do (`text/plain` first, then the metadata, then the others) and gets a short note,
//!   reserved within the budget;
//! - a display id is charged its length once, when first seen (the tracker holds it);
//! - `update_display_data` is all or nothing: it is charged what it adds to the response, that is the new
//!   size times the number of displays showing that id, minus what those displays showed (it may be
//!   negative: a smaller update gives bytes back). If that does not fit, the displays keep their content;
//! - `clear_output` gives back everything it removes;
//! - the reply's error, reported only when no error output was kept, uses what is left of the budget, or
//!   is cut to [`ERROR_RESERVE`] bytes, so a failure is always reported, briefly.
//!
//! Stream text and errors that do not fit are cut with a marker, and then the output is *closed*: no new
//! output is kept until a `clear_output` (updates still are, within the budget). An output that does not
//! fit even cut (not its skeleton, or not a bundle's note) is dropped. So the response (outputs, `stdout`,
//! `stderr`, `error`) stays within `cap + `[`CAP_SLACK`]: the slack covers one closing marker (twice) and
//! the reply's brief error. `truncated` is set whenever anything was cut or dropped, including by the wire
//! layer (`Message::dropped_bytes`). Events carry only what was kept; over time an SSE stream can carry
//! more than the cap (updates and clears give bytes back), but never more than the cap at once.
//!
//! # Displays sharing an id
//!
//! A display shown with a `display_id` keeps its own content until an update for that id arrives (as
//! JupyterLab does); the update then makes every display of that id point to ONE shared entry. An update
//! is O(its size): each display moves from its own content to the shared entry once, so the work over an
//! execution is O(displays + update bytes), never O(displays × updates). The outputs returned repeat the
//! shared entry in every display that shows it; that is what the update was charged for, so the
//! materialized outputs stay within the cap.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::client::Channel;
use super::wire::Message;

mod json_size;

use json_size::{json_len, json_prefix, json_str_len};

/// How many times the response carries stream text (`outputs` and `stdout`/`stderr`) and an error output
/// (`outputs` and `error`).
const COPIES: usize = 2;

/// The reply's error, when it is reported and the budget is spent, is cut to this many bytes of JSON.
pub const ERROR_RESERVE: usize = 1024;

/// An upper bound on the note added to a bundle that lost MIME types (see [`omission_note`]).
const NOTE_MAX: usize = 1024;

/// How far past the cap a response may go: one closing marker, carried twice, and the reply's error in its
/// brief form ([`ERROR_RESERVE`] and a marker), and the outputs array's brackets.
pub const CAP_SLACK: usize = 2048;

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
    /// The first error output, or else the reply's error (see [`ERROR_RESERVE`]).
    pub error: Option<ErrorInfo>,
    /// Something was cut or dropped.
    pub truncated: bool,
}

/// The data and metadata of a display, with their serialized size (the two maps' JSON).
#[derive(Debug)]
struct Bundle {
    data: Map<String, Value>,
    metadata: Map<String, Value>,
    size: usize,
}

impl Bundle {
    fn new(data: Map<String, Value>, metadata: Map<String, Value>) -> Self {
        let size = json_len(&data).saturating_add(json_len(&metadata));
        Bundle { data, metadata, size }
    }

    fn to_output(&self) -> Output {
        Output::DisplayData { data: self.data.clone(), metadata: self.metadata.clone() }
    }
}

/// One output, as the tracker keeps it.
#[derive(Debug)]
enum Slot {
    /// Anything but a display with a `display_id`.
    Output(Output),
    /// A display with a `display_id`, still showing its own content.
    Own(Bundle),
    /// A display whose id was updated: index into [`ExecutionTracker::entries`].
    Shared(usize),
}

/// The displays shown with one `display_id`.
#[derive(Debug, Default)]
struct DisplayGroup {
    /// The content of the last accepted update: index into [`ExecutionTracker::entries`].
    shared: Option<usize>,
    /// How many displays show `shared`.
    shared_refs: usize,
    /// Displays shown since the last update, still with their own content (slot indices): the next
    /// update moves them to `shared`, so each display is moved once.
    own: Vec<usize>,
    /// Sum of their bundles' sizes.
    own_size: usize,
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
    /// Bytes charged for what is kept now (see the module doc); never above `cap`.
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
                // Cut to the cap now, so no more than that is held; how much is reported is decided at the end.
                let error = (status == ReplyStatus::Error).then(|| {
                    let error = error_info(c);
                    if json_len(&error) <= self.cap {
                        return error;
                    }
                    self.truncated = true;
                    cut_error(error, self.cap, &self.marker())
                });
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
        self.slots.clear();
        self.entries.clear();
        self.displays.clear();
        self.used = 0;
        self.closed = false;
        self.clear_pending = false;
        vec![Event::Cleared]
    }

    /// A new output first carries out a pending `clear_output(wait=True)`.
    fn start_output(&mut self) -> Vec<Event> {
        if self.clear_pending { self.clear() } else { Vec::new() }
    }

    /// Bytes of budget left.
    fn room(&self) -> usize {
        self.cap.saturating_sub(self.used)
    }

    fn marker(&self) -> String {
        format!("\n[kernelbox: output truncated, limit of {} bytes reached]\n", self.cap)
    }

    /// Dropped whole: it did not fit, or the output is closed.
    fn drop_output(&mut self, events: Vec<Event>) -> Vec<Event> {
        self.truncated = true;
        events
    }

    fn push_stream(&mut self, name: String, text: String) -> Vec<Event> {
        let mut events = self.start_output();
        if self.closed {
            return self.drop_output(events);
        }
        // Consecutive stream output of one name is one output, as a notebook shows it.
        let merge = matches!(self.slots.last(), Some(Slot::Output(Output::Stream { name: last, .. })) if *last == name);
        let skeleton = if merge { 0 } else { output_len(&Output::Stream { name: name.clone(), text: String::new() }) };
        let cost = skeleton.saturating_add(json_str_len(&text).saturating_mul(COPIES));
        let text = if cost <= self.room() {
            self.used += cost;
            text
        } else if skeleton <= self.room() {
            let fits = json_prefix(&text, (self.room() - skeleton) / COPIES);
            self.used += skeleton + json_str_len(fits) * COPIES;
            let cut = fits.to_owned() + &self.marker();
            self.closed = true;
            self.truncated = true;
            cut
        } else {
            return self.drop_output(events);
        };
        match self.slots.last_mut() {
            Some(Slot::Output(Output::Stream { text: last, .. })) if merge => last.push_str(&text),
            _ => self.slots.push(Slot::Output(Output::Stream { name: name.clone(), text: text.clone() })),
        }
        events.push(Event::Output { output: Output::Stream { name, text }, display_id: None });
        events
    }

    /// A `display_data` (`count` is `None`) or an `execute_result`.
    fn push_bundle(
        &mut self,
        display_id: Option<&str>,
        count: Option<Option<u64>>,
        data: Map<String, Value>,
        metadata: Map<String, Value>,
    ) -> Vec<Event> {
        let mut events = self.start_output();
        if self.closed {
            return self.drop_output(events);
        }
        let (empty, new_id) = (Map::new(), display_id.filter(|id| !self.displays.contains_key(*id)));
        let skeleton = match count {
            Some(execution_count) => {
                output_len(&Output::ExecuteResult { execution_count, data: empty.clone(), metadata: empty })
            }
            None => output_len(&Output::DisplayData { data: empty.clone(), metadata: empty }),
        } - 4; // the two `{}` are counted with the bundle
        let fixed = skeleton + new_id.map_or(0, str::len);
        let Some(bundle) = self.fit_bundle(fixed, data, metadata) else {
            return self.drop_output(events);
        };
        self.used += fixed + bundle.size;
        let output = match (display_id, count) {
            (Some(id), None) => {
                let group = self.displays.entry(id.to_owned()).or_default();
                group.own.push(self.slots.len());
                group.own_size += bundle.size;
                let output = bundle.to_output();
                self.slots.push(Slot::Own(bundle));
                output
            }
            (_, count) => {
                let Bundle { data, metadata, .. } = bundle;
                let output = match count {
                    Some(execution_count) => Output::ExecuteResult { execution_count, data, metadata },
                    None => Output::DisplayData { data, metadata },
                };
                self.slots.push(Slot::Output(output.clone()));
                output
            }
        };
        events.push(Event::Output { output, display_id: display_id.map(str::to_owned) });
        events
    }

    /// Fits a bundle into what is left after `fixed` bytes. Whole if it fits; otherwise the MIME types that
    /// fit (`text/plain` first, then the metadata, then the others) and a note. `None` when not even
    /// the note fits.
    fn fit_bundle(&mut self, fixed: usize, data: Map<String, Value>, metadata: Map<String, Value>) -> Option<Bundle> {
        let bundle = Bundle::new(data, metadata);
        if fixed.saturating_add(bundle.size) <= self.room() {
            return Some(bundle);
        }
        self.truncated = true;
        // Two pairs of braces, then each kept entry: key, colon, value, comma.
        let mut room = self.room().checked_sub(fixed.saturating_add(NOTE_MAX + 4))?;
        let Bundle { mut data, mut metadata, .. } = bundle;
        let mut omitted = Vec::new();
        let mut keys: Vec<String> = data.keys().cloned().collect();
        keys.sort_by_key(|k| k != "text/plain");
        let plain = usize::from(keys.first().is_some_and(|k| k == "text/plain"));
        let fit = |room: &mut usize, size: usize| {
            let fits = size <= *room;
            if fits {
                *room -= size;
            }
            fits
        };
        for key in &keys[..plain] {
            let size = json_str_len(key) + 4 + json_len(&data[key]);
            if !fit(&mut room, size) {
                data.remove(key);
                omitted.push(key.clone());
            }
        }
        if !fit(&mut room, json_len(&metadata)) {
            metadata = Map::new();
            omitted.push("metadata".to_owned());
        }
        for key in &keys[plain..] {
            let size = json_str_len(key) + 4 + json_len(&data[key]);
            if !fit(&mut room, size) {
                data.remove(key);
                omitted.push(key.clone());
            }
        }
        let (note, kernelbox) = omission_note(&omitted, self.cap);
        data.entry("text/plain").or_insert_with(|| Value::String(note));
        metadata.insert("kernelbox".into(), kernelbox);
        let bundle = Bundle::new(data, metadata);
        // The note's reserve makes this always true; checked so that a wrong bound cannot break the cap.
        (fixed.saturating_add(bundle.size) <= self.room()).then_some(bundle)
    }

    fn push_error(&mut self, error: ErrorInfo) -> Vec<Event> {
        let mut events = self.start_output();
        if self.closed {
            return self.drop_output(events);
        }
        let empty = ErrorInfo { ename: String::new(), evalue: String::new(), traceback: Vec::new() };
        // What the output adds to the `error` field's shape: `"output_type":"error",` and a separator.
        let extra = output_len(&error_output(empty.clone())) - json_len(&empty);
        let cost = json_len(&error).saturating_mul(COPIES).saturating_add(extra);
        let error = if cost <= self.room() {
            self.used += cost;
            error
        } else if extra + json_len(&empty) * COPIES <= self.room() {
            let cut = cut_error(error, (self.room() - extra) / COPIES, &self.marker());
            self.used = (self.used + extra + json_len(&cut) * COPIES).min(self.cap);
            self.closed = true;
            self.truncated = true;
            cut
        } else {
            return self.drop_output(events);
        };
        let output = error_output(error);
        self.slots.push(Slot::Output(output.clone()));
        events.push(Event::Output { output, display_id: None });
        events
    }

    /// `update_display_data`: every display of `id` shows the new content, if the response can carry it.
    fn update(&mut self, id: &str, data: Map<String, Value>, metadata: Map<String, Value>) -> Vec<Event> {
        // Displays that were never shown (or were cleared) cannot be updated, as in a notebook.
        let Some(group) = self.displays.get_mut(id) else {
            return Vec::new();
        };
        let bundle = Bundle::new(data, metadata);
        let shown = group.shared_refs + group.own.len();
        let shared_size = group.shared.map_or(0, |i| self.entries[i].size);
        let before = group.shared_refs.saturating_mul(shared_size).saturating_add(group.own_size);
        let after = shown.saturating_mul(bundle.size);
        let used = self.used.saturating_sub(before).saturating_add(after);
        if used > self.cap {
            self.truncated = true;
            return Vec::new();
        }
        self.used = used;
        let output = bundle.to_output();
        let entry = match group.shared {
            Some(i) => {
                self.entries[i] = bundle;
                i
            }
            None => {
                self.entries.push(bundle);
                group.shared = Some(self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        for slot in group.own.drain(..) {
            self.slots[slot] = Slot::Shared(entry);
        }
        group.shared_refs = shown;
        group.own_size = 0;
        vec![Event::Updated { display_id: id.to_owned(), output }]
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

    /// The outputs so far, as the response shows them.
    pub fn outputs(&self) -> Vec<Output> {
        self.slots
            .iter()
            .map(|slot| match slot {
                Slot::Output(output) => output.clone(),
                Slot::Own(bundle) => bundle.to_output(),
                Slot::Shared(entry) => self.entries[*entry].to_output(),
            })
            .collect()
    }

    pub fn into_outputs(self) -> Vec<Output> {
        self.outputs()
    }

    /// Everything the response carries: the outputs, and the error to report (the first error output, or
    /// the reply's error within what is left of the budget, or else cut to [`ERROR_RESERVE`]).
    pub fn into_report(mut self) -> Report {
        let outputs = self.outputs();
        let error = first_error(&outputs).or_else(|| {
            let error = self.reply.as_mut()?.error.take()?;
            if json_len(&error) <= self.room() {
                return Some(error);
            }
            self.truncated = true;
            Some(cut_error(error, self.room().max(ERROR_RESERVE), &self.marker()))
        });
        Report { reply: self.reply(), outputs, error, truncated: self.truncated }
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

fn error_output(e: ErrorInfo) -> Output {
    Output::Error { ename: e.ename, evalue: e.evalue, traceback: e.traceback }
}

/// `error` cut so that its JSON is at most `max` bytes, plus `marker` as a last traceback line: the
/// name, then the value, then the traceback lines that fit.
fn cut_error(error: ErrorInfo, max: usize, marker: &str) -> ErrorInfo {
    let empty = ErrorInfo { ename: String::new(), evalue: String::new(), traceback: Vec::new() };
    let mut room = max.saturating_sub(json_len(&empty));
    let ename = take_prefix(&error.ename, &mut room);
    let evalue = take_prefix(&error.evalue, &mut room);
    let mut traceback = Vec::new();
    // Each line also costs its quotes and a separator.
    for line in &error.traceback {
        let Some(mut line_room) = room.checked_sub(3) else { break };
        let part = take_prefix(line, &mut line_room);
        room = line_room;
        let whole = part.len() == line.len();
        traceback.push(part);
        if !whole {
            break;
        }
    }
    traceback.push(marker.to_owned());
    ErrorInfo { ename, evalue, traceback }
}

/// The longest prefix of `s` that fits in `room` bytes of JSON, taken out of `room`.
fn take_prefix(s: &str, room: &mut usize) -> String {
    let part = json_prefix(s, *room);
    *room -= json_str_len(part);
    part.to_owned()
}

/// The note on a bundle that lost MIME types: a `text/plain` stand-in and the `kernelbox` metadata. Its
/// size is bounded ([`NOTE_MAX`]) whatever the names: a few are listed, cut and reduced to MIME-ish
/// characters.
fn omission_note(omitted: &[String], cap: usize) -> (String, Value) {
    const LISTED: usize = 4;
    const NAME_MAX: usize = 40;
    let names: Vec<String> = omitted
        .iter()
        .take(LISTED)
        .map(|m| m.chars().filter(|c| c.is_ascii_alphanumeric() || "+-./_".contains(*c)).take(NAME_MAX).collect())
        .collect();
    let more = match omitted.len().saturating_sub(LISTED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let note = format!("[kernelbox: output omitted ({}{more}), limit of {cap} bytes reached]", names.join(", "));
    let meta = json!({"truncated": true, "omitted": names, "message": note});
    (note, meta)
}

/// What one more output costs: its JSON and a separator in the outputs array.
fn output_len(output: &Output) -> usize {
    json_len(output).saturating_add(1)
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
