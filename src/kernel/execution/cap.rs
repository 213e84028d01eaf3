//! The output cap: what an execution keeps of its outputs, and what each kept byte costs against a budget
//! measured as the response will carry it.
//!
//! It owns the kept outputs (`Slot`, `Bundle`, `DisplayGroup`) and the budget: each method here that keeps,
//! replaces or clears an output charges or refunds it in the same step, which is why nothing else writes
//! that state. They are methods of [`ExecutionTracker`] in an `impl` of their own rather than a type of
//! their own, because they share the tracker's `truncated` flag with the state machine (`execution.rs`).
//! This file must not decide which messages belong to the execution, nor when it is complete; it knows
//! nothing of the wire.
//!
//! # The output cap
//!
//! The cap bounds what the response carries, measured as compact JSON (strings with their escapes, as
//! `serde_json` writes them). Every byte kept is charged when it is kept:
//!
//! - each new output is charged its whole serialized size plus one byte (the separator in the array), so
//!   even an empty bundle costs its skeleton (about 50 bytes) and the number of outputs is bounded;
//! - stream text is charged once: the whole cap is there for what the code prints. The response's
//!   `stdout`/`stderr` repeat it only within what is left at the end ([`ExecutionTracker::stream_fields`]):
//!   whole when it fits, else the beginning and end of each with a marker between (`streams_abridged`), so a print of
//!   900 KiB comes back whole in `outputs` under a 1 MiB cap;
//! - error outputs are charged twice, because the response carries the first one twice (also as
//!   `error`, which clients read for the failure);
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
//! `stderr`, `error`) stays within `cap + `[`CAP_SLACK`]: the slack covers one closing marker (twice, for
//! an error), the reply's brief error and the markers of abridged `stdout`/`stderr`. `truncated` is set
//! whenever anything the code printed or showed was cut or dropped, including by the wire layer
//! (`Message::dropped_bytes`); abridged `stdout`/`stderr` are not that (`outputs` has the whole text). Events carry only what was kept; over time an SSE stream can carry
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

use serde_json::{Map, Value, json};

use super::json_size::{json_len, json_prefix, json_str_len, json_suffix};
use super::{ErrorInfo, Event, ExecutionTracker, Output, stream_text};

/// How many times the response carries an error output (`outputs` and `error`).
const ERROR_COPIES: usize = 2;

/// The reply's error, when it is reported and the budget is spent, is cut to this many bytes of JSON.
pub const ERROR_RESERVE: usize = 1024;

/// What an abridged `stdout`/`stderr` always keeps of its end, even when nothing is left of the budget:
/// enough for the closing marker of a cut output (or the kernel's note of what it dropped), so a client
/// that reads only `stdout` still learns that the output was truncated.
const KEPT_TAIL: usize = 128;

/// An upper bound on the note added to a bundle that lost MIME types (see [`omission_note`]).
const NOTE_MAX: usize = 1024;

/// How far past the cap a response may go: one closing marker (carried twice for an error), the reply's
/// error in its brief form ([`ERROR_RESERVE`] and a marker), the markers of abridged `stdout`/`stderr`
/// and the [`KEPT_TAIL`] each keeps, and the outputs array's brackets.
pub const CAP_SLACK: usize = 2048;

/// The data and metadata of a display, with their serialized size (the two maps' JSON).
#[derive(Debug)]
pub(super) struct Bundle {
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
pub(super) enum Slot {
    /// Anything but a display with a `display_id`.
    Output(Output),
    /// A display with a `display_id`, still showing its own content.
    Own(Bundle),
    /// A display whose id was updated: index into [`ExecutionTracker::entries`].
    Shared(usize),
}

/// The displays shown with one `display_id`.
#[derive(Debug, Default)]
pub(super) struct DisplayGroup {
    /// The content of the last accepted update: index into [`ExecutionTracker::entries`].
    shared: Option<usize>,
    /// How many displays show `shared`. (`pub(super)` for the tests, which check the sharing's shape.)
    pub(super) shared_refs: usize,
    /// Displays shown since the last update, still with their own content (slot indices): the next
    /// update moves them to `shared`, so each display is moved once. (`pub(super)` for the tests.)
    pub(super) own: Vec<usize>,
    /// Sum of their bundles' sizes.
    own_size: usize,
}

impl ExecutionTracker {
    /// The reply's error as it is held until the report: cut to the cap now, so no more than that is held;
    /// how much is reported is decided at the end ([`Self::report_reply_error`]).
    pub(super) fn hold_reply_error(&mut self, error: ErrorInfo) -> ErrorInfo {
        if json_len(&error) <= self.cap {
            return error;
        }
        self.truncated = true;
        cut_error(error, self.cap, &self.marker())
    }

    /// The reply's error as the report carries it when no error output was kept: whole if it fits in what
    /// is left of the budget, or else cut to [`ERROR_RESERVE`], so a failure is always reported, briefly.
    /// What it takes is charged (within the cap), so `stdout`/`stderr` get only what is left after it.
    pub(super) fn report_reply_error(&mut self, error: ErrorInfo) -> ErrorInfo {
        let error = if json_len(&error) <= self.room() {
            error
        } else {
            self.truncated = true;
            cut_error(error, self.room().max(ERROR_RESERVE), &self.marker())
        };
        self.used = self.used.saturating_add(json_len(&error)).min(self.cap);
        error
    }

    /// The response's `stdout` and `stderr` (the text of the stream outputs, concatenated by name), within
    /// what is left of the budget once everything else is charged: both whole when they fit; otherwise a
    /// field that fits in half of what is left stays whole, and the other (or each, in half) keeps its
    /// beginning and end with a marker between. The last value says whether one was abridged.
    pub(super) fn stream_fields(&self, outputs: &[Output]) -> (String, String, bool) {
        let (stdout, stderr) = (stream_text(outputs, "stdout"), stream_text(outputs, "stderr"));
        let (out_len, err_len, room) = (json_str_len(&stdout), json_str_len(&stderr), self.room());
        if out_len.saturating_add(err_len) <= room {
            return (stdout, stderr, false);
        }
        let half = room / 2;
        let (out_room, err_room) = match (out_len <= half, err_len <= half) {
            (true, _) => (out_len, room - out_len),
            (_, true) => (room - err_len, err_len),
            _ => (half, room - half),
        };
        let abridge = |text: String, len: usize, room: usize, name: &str| match len <= room {
            true => text,
            // The beginning and the end, the marker between: the end is where a program's last words
            // are (its result, its error, the kernel's note of what it dropped).
            false => {
                let head = json_prefix(&text, room / 2);
                let tail_room = (room - json_str_len(head)).max(KEPT_TAIL);
                let tail = json_suffix(&text[head.len()..], tail_room);
                format!("{head}{}{tail}", abridged_marker(name))
            }
        };
        (abridge(stdout, out_len, out_room, "stdout"), abridge(stderr, err_len, err_room, "stderr"), true)
    }

    /// `clear_output`: clears now, or (`wait`) when the next output comes, so a display redrawn in a loop
    /// does not flicker.
    pub(super) fn clear_output(&mut self, wait: bool) -> Vec<Event> {
        if wait {
            self.clear_pending = true;
            Vec::new()
        } else {
            self.clear()
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

    pub(super) fn push_stream(&mut self, name: String, text: String) -> Vec<Event> {
        let mut events = self.start_output();
        if self.closed {
            return self.drop_output(events);
        }
        // Consecutive stream output of one name is one output, as a notebook shows it.
        let merge = matches!(self.slots.last(), Some(Slot::Output(Output::Stream { name: last, .. })) if *last == name);
        let skeleton = if merge { 0 } else { output_len(&Output::Stream { name: name.clone(), text: String::new() }) };
        let cost = skeleton.saturating_add(json_str_len(&text));
        let text = if cost <= self.room() {
            self.used += cost;
            text
        } else if skeleton <= self.room() {
            let fits = json_prefix(&text, self.room() - skeleton);
            self.used += skeleton + json_str_len(fits);
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
    pub(super) fn push_bundle(
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

    pub(super) fn push_error(&mut self, error: ErrorInfo) -> Vec<Event> {
        let mut events = self.start_output();
        if self.closed {
            return self.drop_output(events);
        }
        let empty = ErrorInfo { ename: String::new(), evalue: String::new(), traceback: Vec::new() };
        // What the output adds to the `error` field's shape: `"output_type":"error",` and a separator.
        let extra = output_len(&error_output(empty.clone())) - json_len(&empty);
        let cost = json_len(&error).saturating_mul(ERROR_COPIES).saturating_add(extra);
        let error = if cost <= self.room() {
            self.used += cost;
            error
        } else if extra + json_len(&empty) * ERROR_COPIES <= self.room() {
            let cut = cut_error(error, (self.room() - extra) / ERROR_COPIES, &self.marker());
            self.used = (self.used + extra + json_len(&cut) * ERROR_COPIES).min(self.cap);
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
    pub(super) fn update(&mut self, id: &str, data: Map<String, Value>, metadata: Map<String, Value>) -> Vec<Event> {
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
}

/// What ends an abridged `stdout`/`stderr` (under 128 bytes of JSON, within the slack).
fn abridged_marker(name: &str) -> String {
    format!("\n[kernelbox: {name} abridged to keep the response within the output cap; `outputs` has the whole text]\n")
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
pub(super) fn output_len(output: &Output) -> usize {
    json_len(output).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_abridged_marker_is_within_its_bound() {
        for name in ["stdout", "stderr"] {
            assert!(json_str_len(&abridged_marker(name)) < 128, "CAP_SLACK counts on it");
        }
    }

    #[test]
    fn the_omission_note_is_bounded_whatever_the_names() {
        let names: Vec<String> = (0..1000).map(|i| format!("{i}{}", "\u{1}\"é".repeat(10_000))).collect();
        let (note, meta) = omission_note(&names, usize::MAX);
        // The note may stand in for text/plain and always goes in the metadata.
        let added = json_len(&json!({"text/plain": note, "kernelbox": meta}));
        assert!(added <= NOTE_MAX, "{added}");
    }
}
