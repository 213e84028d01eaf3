//! `ExecutionTracker` fed message by message: which messages are ours, completion, the outputs they make,
//! and the output cap checked on the whole response (tables run through one `check`).

use serde_json::json;

use super::cap::output_len;
use super::json_size::json_len;
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

/// One message for a table: channel, type, content.
type Msg = (Channel, &'static str, Value);

fn stream(name: &str, text: String) -> Msg {
    (Channel::IOPub, "stream", json!({"name": name, "text": text}))
}

fn display(id: Option<&str>, data: Value, metadata: Value) -> Msg {
    let transient = id.map_or(json!({}), |id| json!({"display_id": id}));
    (Channel::IOPub, "display_data", json!({"data": data, "metadata": metadata, "transient": transient}))
}

fn update(id: &str, data: Value) -> Msg {
    (Channel::IOPub, "update_display_data", json!({"data": data, "metadata": {}, "transient": {"display_id": id}}))
}

fn result(data: Value, metadata: Value) -> Msg {
    (Channel::IOPub, "execute_result", json!({"execution_count": 7, "data": data, "metadata": metadata}))
}

fn error(msg_type: &'static str, ename: String, evalue: String, traceback: Vec<String>) -> Msg {
    let channel = if msg_type == "error" { Channel::IOPub } else { Channel::Shell };
    (channel, msg_type, json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": traceback}))
}

fn text(s: &str) -> Value {
    json!({"text/plain": s})
}

fn x(n: usize) -> String {
    "x".repeat(n)
}

/// What the tracker bounds: the response's outputs, `stdout`, `stderr` and `error`, as the actor
/// builds them.
fn response_len(report: &Report) -> usize {
    json_len(&report.outputs) + json_len(&report.stdout) + json_len(&report.stderr) + json_len(&report.error)
}

/// A table row: messages in, whether the report says `truncated`, and a check of the report.
struct Case {
    name: &'static str,
    messages: Vec<Msg>,
    truncated: bool,
    check: fn(&Report),
}

fn case(name: &'static str, messages: Vec<Msg>, truncated: bool) -> Case {
    Case { name, messages, truncated, check: |_| {} }
}

/// Runs every case with `cap`: the response and every streamed event stay within `cap + CAP_SLACK`,
/// and `truncated` is as expected.
fn check(cap: usize, cases: Vec<Case>) {
    for Case { name, messages, truncated, check } in cases {
        let mut t = ExecutionTracker::new(ID.into(), cap);
        for (channel, msg_type, content) in messages {
            for event in t.handle(channel, &msg(msg_type, ID, content)) {
                let size = match &event {
                    Event::Output { output, .. } | Event::Updated { output, .. } => json_len(output),
                    Event::Cleared | Event::InputRequested(_) => 0,
                };
                assert!(size <= cap + CAP_SLACK, "{name}: an event of {size} bytes for a cap of {cap}");
            }
        }
        let report = t.into_report();
        let size = response_len(&report);
        assert!(size <= cap + CAP_SLACK, "{name}: a response of {size} bytes for a cap of {cap}");
        assert_eq!(report.truncated, truncated, "{name}: truncated");
        check(&report);
    }
}

/// The cap in the tables: 64 KiB, with payloads sized as multiples of it (as measured against 1 MiB).
const CAP: usize = 64 * 1024;

fn shown_text(output: &Output) -> &str {
    match output {
        Output::DisplayData { data, .. } => data["text/plain"].as_str().unwrap_or_default(),
        other => panic!("not a display: {other:?}"),
    }
}

#[test]
fn updates_are_counted() {
    check(
        CAP,
        vec![
            Case {
                name: "five updates of 3× the cap are refused",
                messages: std::iter::once(display(Some("p"), text("0%"), json!({})))
                    .chain((0..5).map(|_| update("p", text(&x(3 * CAP)))))
                    .collect(),
                truncated: true,
                check: |r| assert_eq!(shown_text(&r.outputs[0]), "0%"),
            },
            Case {
                name: "updates that fit replace the display, whatever their number",
                messages: std::iter::once(display(Some("p"), text("0%"), json!({})))
                    .chain((0..50).map(|i| update("p", text(&format!("{i}{}", x(CAP / 4))))))
                    .collect(),
                truncated: false,
                check: |r| assert!(shown_text(&r.outputs[0]).starts_with("49x")),
            },
            Case {
                name: "growing updates stop at the last one that fits",
                messages: std::iter::once(display(Some("p"), text(""), json!({})))
                    .chain((1..=10).map(|k| update("p", text(&x(k * CAP / 8)))))
                    .collect(),
                truncated: true,
                check: |r| assert_eq!(shown_text(&r.outputs[0]).len(), 7 * CAP / 8),
            },
            Case {
                name: "an update's metadata counts",
                messages: vec![
                    display(Some("p"), text("0%"), json!({})),
                    (
                        Channel::IOPub,
                        "update_display_data",
                        json!({"data": text("1%"), "metadata": {"m": x(2 * CAP)}, "transient": {"display_id": "p"}}),
                    ),
                ],
                truncated: true,
                check: |r| assert_eq!(shown_text(&r.outputs[0]), "0%"),
            },
        ],
    );
}

#[test]
fn an_update_is_charged_once_per_display_that_shows_it() {
    let forty = |update_size: usize| -> Vec<Msg> {
        (0..40)
            .map(|_| display(Some("q"), text("."), json!({})))
            .chain(std::iter::once(update("q", text(&x(update_size)))))
            .collect()
    };
    check(
        CAP,
        vec![
            Case {
                name: "40 displays, an update of 2× the cap",
                messages: forty(2 * CAP),
                truncated: true,
                check: |r| assert!(r.outputs.iter().all(|o| shown_text(o) == ".")),
            },
            Case {
                name: "40 displays, an update of 1/20 of the cap (2× the cap shown)",
                messages: forty(CAP / 20),
                truncated: true,
                check: |r| assert!(r.outputs.iter().all(|o| shown_text(o) == ".")),
            },
            Case {
                name: "40 displays, an update of 1/100 of the cap",
                messages: forty(CAP / 100),
                truncated: false,
                check: |r| {
                    assert_eq!(r.outputs.len(), 40);
                    assert!(r.outputs.iter().all(|o| shown_text(o).len() == CAP / 100));
                },
            },
        ],
    );
}

#[test]
fn display_metadata_is_counted() {
    check(
        CAP,
        vec![
            Case {
                name: "50 displays with metadata of the cap's size",
                messages: (0..50).map(|_| display(None, text("fig"), json!({"m": x(CAP)}))).collect(),
                truncated: true,
                check: |r| match &r.outputs[0] {
                    Output::DisplayData { data, metadata } => {
                        assert_eq!(data["text/plain"], "fig");
                        assert_eq!(metadata["kernelbox"]["omitted"], json!(["metadata"]));
                    }
                    other => panic!("unexpected {other:?}"),
                },
            },
            case(
                "50 results with metadata of 1/10 of the cap",
                (0..50).map(|_| result(text("1"), json!({"m": x(CAP / 10)}))).collect(),
                true,
            ),
            case("small metadata is kept", vec![display(None, text("fig"), json!({"width": 640}))], false),
        ],
    );
}

#[test]
fn error_outputs_are_cut() {
    let huge = || x(20 * CAP);
    check(
        CAP,
        vec![
            Case {
                name: "an evalue of 20× the cap, in the output and the reply",
                messages: vec![
                    error("error", "ValueError".into(), huge(), vec!["tb".into()]),
                    error("execute_reply", "ValueError".into(), huge(), vec!["tb".into()]),
                ],
                truncated: true,
                check: |r| {
                    let e = r.error.as_ref().unwrap();
                    assert_eq!(e.ename, "ValueError");
                    assert!(e.evalue.len() < CAP / 2);
                    assert!(e.traceback.last().unwrap().contains("[kernelbox: output truncated"));
                },
            },
            case(
                "a traceback of 1,000 lines of 1/100 of the cap",
                vec![error("error", "E".into(), "v".into(), vec![x(CAP / 100); 1000])],
                true,
            ),
            case("an ename of 20× the cap", vec![error("error", huge(), "v".into(), vec![])], true),
            case(
                "control characters count as their escapes",
                vec![error("error", "E".into(), "\u{1}".repeat(CAP), vec![])],
                true,
            ),
            Case {
                name: "a small error is whole",
                messages: vec![error("error", "E".into(), "v".into(), vec!["tb".into()])],
                truncated: false,
                check: |r| assert_eq!(r.error.as_ref().unwrap().traceback, vec!["tb".to_owned()]),
            },
        ],
    );
}

#[test]
fn the_replys_error_is_capped() {
    check(
        CAP,
        vec![
            Case {
                name: "budget spent by stdout, then a reply error of 10× the cap",
                messages: vec![
                    stream("stdout", x(2 * CAP)),
                    error("execute_reply", "E".into(), x(10 * CAP), vec![x(100); 100]),
                ],
                truncated: true,
                check: |r| {
                    let e = r.error.as_ref().unwrap();
                    assert_eq!(e.ename, "E");
                    assert!(json_len(e) <= ERROR_RESERVE + 100, "{}", json_len(e));
                },
            },
            case(
                "no output, a reply error of 10× the cap",
                vec![error("execute_reply", "E".into(), x(10 * CAP), vec![])],
                true,
            ),
            Case {
                name: "a reply error that fits is whole",
                messages: vec![stream("stdout", x(CAP / 4)), error("execute_reply", "E".into(), x(CAP / 4), vec![])],
                truncated: false,
                check: |r| assert_eq!(r.error.as_ref().unwrap().evalue.len(), CAP / 4),
            },
        ],
    );
}

#[test]
fn every_output_costs_at_least_its_skeleton() {
    check(
        CAP,
        vec![
            Case {
                name: "5,000 empty displays (4× the cap in skeletons)",
                messages: (0..5_000).map(|_| display(None, json!({}), json!({}))).collect(),
                truncated: true,
                check: |r| assert!(r.outputs.len() < CAP / 40, "{}", r.outputs.len()),
            },
            case("5,000 empty results", (0..5_000).map(|_| result(json!({}), json!({}))).collect(), true),
            case(
                "5,000 empty stream messages",
                (0..5_000).map(|i| stream(["a", "b"][i % 2], String::new())).collect(),
                true,
            ),
            case(
                "5,000 empty errors",
                (0..5_000).map(|_| error("error", String::new(), String::new(), vec![])).collect(),
                true,
            ),
            case("10 empty displays", (0..10).map(|_| display(None, json!({}), json!({}))).collect(), false),
        ],
    );
}

/// The whole text printed, as the outputs carry it.
fn printed(report: &Report, name: &str) -> String {
    stream_text(&report.outputs, name)
}

#[test]
fn printed_text_is_counted_once_and_stdout_stderr_repeat_it_within_what_is_left() {
    check(
        CAP,
        vec![
            Case {
                name: "stdout of 0.9× the cap: whole in the outputs, stdout abridged",
                messages: vec![stream("stdout", x(CAP * 9 / 10))],
                truncated: false,
                check: |r| {
                    assert_eq!(printed(r, "stdout"), x(CAP * 9 / 10), "the outputs carry every byte");
                    assert!(r.streams_abridged);
                    assert!(r.stdout.starts_with(&x(CAP / 40)) && r.stdout.len() < CAP / 5, "{}", r.stdout.len());
                    assert!(r.stdout.contains("`outputs` has the whole text]\n"), "a marker says where the rest is");
                    assert!(r.stdout.ends_with(&x(CAP / 40)), "and the end of the text follows it");
                },
            },
            Case {
                name: "stdout and stderr of 1/3 of the cap each: whole in the outputs, both fields abridged",
                messages: vec![stream("stdout", x(CAP / 3)), stream("stderr", x(CAP / 3))],
                truncated: false,
                check: |r| {
                    assert_eq!((printed(r, "stdout").len(), printed(r, "stderr").len()), (CAP / 3, CAP / 3));
                    assert!(r.streams_abridged && r.stdout.contains("[kernelbox: stdout abridged"));
                    assert!(r.stderr.contains("[kernelbox: stderr abridged"));
                },
            },
            Case {
                name: "a big stdout and a small stderr: the small one stays whole",
                messages: vec![stream("stdout", x(CAP * 3 / 4)), stream("stderr", "warning\n".into())],
                truncated: false,
                check: |r| {
                    assert_eq!(r.stderr, "warning\n");
                    assert!(r.streams_abridged && r.stdout.len() < CAP / 4);
                },
            },
            Case {
                name: "stdout and stderr of 1/5 of the cap each: every field whole",
                messages: vec![stream("stdout", x(CAP / 5)), stream("stderr", x(CAP / 5))],
                truncated: false,
                check: |r| {
                    assert!(!r.streams_abridged);
                    assert_eq!((r.stdout.clone(), r.stderr.clone()), (printed(r, "stdout"), printed(r, "stderr")));
                },
            },
            case("stdout of 2× the cap", vec![stream("stdout", x(2 * CAP))], true),
            Case {
                name: "stdout of 2× the cap: cut in the outputs, and stdout still ends with the cut's marker",
                messages: vec![stream("stdout", x(2 * CAP))],
                truncated: true,
                check: |r| {
                    assert!(r.streams_abridged);
                    assert!(r.stdout.contains("[kernelbox: stdout abridged"), "{}", r.stdout);
                    assert!(r.stdout.trim_end().ends_with("bytes reached]"), "{}", r.stdout);
                },
            },
            case("newlines count as their escapes", vec![stream("stdout", "\n".repeat(CAP))], true),
            case(
                "10,000 displays with long ids of their own (ids are held, so charged)",
                (0..10_000).map(|i| display(Some(&format!("{i:0>100}")), json!({}), json!({}))).collect(),
                true,
            ),
        ],
    );
}

#[test]
fn a_message_the_wire_layer_cut_makes_the_execution_truncated() {
    let mut t = tracker();
    let mut m = msg("stream", ID, json!({"name": "stdout", "text": "the first part"}));
    m.dropped_bytes = 4096;
    t.handle(Channel::IOPub, &m);
    assert_eq!(stream_text(&t.outputs(), "stdout"), "the first part");
    assert!(t.truncated());
    assert!(t.into_report().truncated);

    // Only our messages count.
    let mut t = tracker();
    let mut other = msg("stream", "someone-else", json!({"name": "stdout", "text": "x"}));
    other.dropped_bytes = 1;
    t.handle(Channel::IOPub, &other);
    assert!(!t.truncated());
}

#[test]
fn displays_sharing_an_id_share_one_entry() {
    let mut t = ExecutionTracker::new(ID.into(), 4 << 20);
    for _ in 0..10_000 {
        feed(&mut t, Channel::IOPub, "display_data", json!({"data": text("0%"), "transient": {"display_id": "bar"}}));
    }
    for i in 0..10_000 {
        let events = feed(
            &mut t,
            Channel::IOPub,
            "update_display_data",
            json!({"data": text(&format!("{i}%")), "transient": {"display_id": "bar"}}),
        );
        assert!(matches!(&events[..], [Event::Updated { display_id, .. }] if display_id == "bar"));
    }
    // The work is bounded by structure: one entry, and no display left to move.
    assert_eq!(t.entries.len(), 1);
    let group = &t.displays["bar"];
    assert_eq!((group.shared_refs, group.own.len()), (10_000, 0));
    assert!(!t.truncated());
    let outputs = t.into_outputs();
    assert_eq!(outputs.len(), 10_000);
    assert!(outputs.iter().all(|o| shown_text(o) == "9999%"));
}

#[test]
fn a_display_keeps_its_own_content_until_its_id_is_updated() {
    let mut t = tracker();
    let show = |t: &mut ExecutionTracker, s: &str| {
        feed(t, Channel::IOPub, "display_data", json!({"data": text(s), "transient": {"display_id": "d"}}))
    };
    show(&mut t, "a");
    show(&mut t, "b");
    let shown = |t: &ExecutionTracker| t.outputs().iter().map(|o| shown_text(o).to_owned()).collect::<Vec<_>>();
    assert_eq!(shown(&t), ["a", "b"]);
    feed(&mut t, Channel::IOPub, "update_display_data", json!({"data": text("c"), "transient": {"display_id": "d"}}));
    show(&mut t, "e");
    assert_eq!(shown(&t), ["c", "c", "e"]);
    feed(&mut t, Channel::IOPub, "update_display_data", json!({"data": text("f"), "transient": {"display_id": "d"}}));
    assert_eq!(shown(&t), ["f", "f", "f"]);
    assert_eq!(t.entries.len(), 1);
}

#[test]
fn a_display_shown_after_clear_output_wait_keeps_its_id() {
    let mut t = tracker();
    let content = |s: &str| json!({"data": text(s), "metadata": {}, "transient": {"display_id": "x"}});
    feed(&mut t, Channel::IOPub, "display_data", content("a"));
    feed(&mut t, Channel::IOPub, "clear_output", json!({"wait": true}));
    let events = feed(&mut t, Channel::IOPub, "display_data", content("b"));
    assert_eq!(events[0], Event::Cleared);
    assert!(matches!(&events[1], Event::Output { display_id: Some(id), .. } if id == "x"));
    let events = feed(&mut t, Channel::IOPub, "update_display_data", content("c"));
    assert_eq!(events.len(), 1);
    let outputs = t.outputs();
    assert_eq!(outputs.len(), 1);
    assert_eq!(shown_text(&outputs[0]), "c");
}

#[test]
fn clear_output_gives_the_budget_back() {
    let mut t = ExecutionTracker::new(ID.into(), 1000);
    for i in 0..100 {
        feed(&mut t, Channel::IOPub, "clear_output", json!({"wait": true}));
        feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": format!("{i}: {}", x(300))}));
    }
    assert!(!t.truncated());
    assert!(stream_text(&t.outputs(), "stdout").starts_with("99: "));
}

#[test]
fn an_update_for_an_unknown_id_is_ignored() {
    let mut t = tracker();
    let events = feed(
        &mut t,
        Channel::IOPub,
        "update_display_data",
        json!({"data": text("1"), "transient": {"display_id": "nope"}}),
    );
    assert!(events.is_empty());
    assert!(t.outputs().is_empty());
}

#[test]
fn an_execution_is_complete_only_after_reply_and_idle() {
    let mut t = tracker();
    feed(&mut t, Channel::IOPub, "status", json!({"execution_state": "busy"}));
    feed(&mut t, Channel::Shell, "execute_reply", json!({"status": "ok", "execution_count": 3}));
    assert!(!t.is_complete());
    feed(&mut t, Channel::IOPub, "status", json!({"execution_state": "idle"}));
    assert!(t.is_complete());
    assert_eq!(t.reply(), Some((ReplyStatus::Ok, Some(3))));
}

#[test]
fn a_lost_idle_status_completes_the_execution_as_truncated() {
    let mut t = tracker();
    assert!(!t.awaits_only_idle(), "nothing came yet");
    feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "a\n"}));
    feed(&mut t, Channel::Shell, "execute_reply", json!({"status": "ok", "execution_count": 1}));
    assert!(t.awaits_only_idle());
    t.idle_lost();
    assert!(t.is_complete());
    let report = t.into_report();
    assert!(report.truncated, "output may have been dropped with the idle status");
    assert_eq!(stream_text(&report.outputs, "stdout"), "a\n");
}

#[test]
fn an_output_the_kernel_cut_itself_makes_the_execution_truncated() {
    let mut t = tracker();
    let md = json!({"kernelbox": {"truncated": true, "message": "cut"}});
    feed(&mut t, Channel::IOPub, "execute_result", json!({"execution_count": 1, "data": text("'xx'"), "metadata": md}));
    assert!(t.truncated());
    let mut t = tracker();
    let md = json!({"kernelbox": {"truncated": "yes"}});
    feed(&mut t, Channel::IOPub, "display_data", json!({"data": text("x"), "metadata": md}));
    assert!(!t.truncated(), "only a boolean true counts");
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
    assert_eq!(t.reply().unwrap().0, ReplyStatus::Error);
    let report = t.into_report();
    assert_eq!(report.error.unwrap().ename, "ZeroDivisionError");
    assert!(!report.truncated);
}

#[test]
fn stream_text_past_the_cap_is_cut_with_a_marker_and_then_dropped() {
    let skeleton = output_len(&Output::Stream { name: "stdout".into(), text: String::new() });
    let mut t = ExecutionTracker::new(ID.into(), skeleton + 10);
    feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "0123456789abcdef"}));
    let more = feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "more"}));
    assert!(more.is_empty());
    assert!(t.truncated());
    let text = stream_text(&t.outputs(), "stdout");
    assert!(text.starts_with("0123456789\n[kernelbox: output truncated"), "{text}");
    assert!(!text.contains("more"));
}

#[test]
fn the_cap_never_splits_a_character() {
    let skeleton = output_len(&Output::Stream { name: "stdout".into(), text: String::new() });
    let mut t = ExecutionTracker::new(ID.into(), skeleton + 5);
    feed(&mut t, Channel::IOPub, "stream", json!({"name": "stdout", "text": "ééé"}));
    assert!(stream_text(&t.outputs(), "stdout").starts_with("éé\n"));
}

#[test]
fn an_image_past_the_cap_is_omitted_and_its_text_kept() {
    let mut t = ExecutionTracker::new(ID.into(), 2000);
    let png = "A".repeat(5000);
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
    assert_eq!(stream_text(&t.outputs(), "stdout"), "c");
}

#[test]
fn update_display_data_replaces_the_display_it_names() {
    let mut t = tracker();
    let first = json!({"data": {"text/plain": "0%"}, "metadata": {}, "transient": {"display_id": "p"}});
    feed(&mut t, Channel::IOPub, "display_data", first);
    let update = json!({"data": {"text/plain": "100%"}, "metadata": {}, "transient": {"display_id": "p"}});
    feed(&mut t, Channel::IOPub, "update_display_data", update);
    assert_eq!(shown_text(&t.outputs()[0]), "100%");
}

#[test]
fn outputs_serialize_in_nbformat_shape() {
    let o = Output::Stream { name: "stdout".into(), text: "hi".into() };
    assert_eq!(serde_json::to_value(&o).unwrap(), json!({"output_type": "stream", "name": "stdout", "text": "hi"}));
}
