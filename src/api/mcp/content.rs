//! Results as MCP content: an execution's outputs in order (text for streams, results and errors, image
//! content for PNG and JPEG displays), files, install reports and manager errors, each with structured
//! content that has the whole result; and the text a progress notification quotes.

use base64::Engine as _;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use crate::kernel::{Event, Output};
use crate::packages::InstallReport;
use crate::session::files::Listing;
use crate::session::{ExecStatus, ExecuteResult, SessionError};
use crate::text::strip_ansi;

/// How much output text one progress notification quotes.
pub const PROGRESS_TEXT: usize = 1000;

pub fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub fn structured(text: String, value: Value, is_error: bool) -> CallToolResult {
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(value);
    result
}

pub fn tool_error(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

/// A manager error as the model sees it: the message, which says what to do (for a limit that was met,
/// when to retry, also as `retry_after_s`).
pub fn failed(e: SessionError) -> CallToolResult {
    let api = crate::error::ApiError::from(e);
    let mut error = json!({"code": api.code, "message": api.message});
    if let Some(wait) = api.retry_after {
        error["retry_after_s"] = json!(crate::rate::retry_after_secs(wait));
    }
    structured(api.message.clone(), json!({ "error": error }), true)
}

fn image_mime(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    [
        (".png", "image/png"),
        (".jpg", "image/jpeg"),
        (".jpeg", "image/jpeg"),
        (".gif", "image/gif"),
        (".webp", "image/webp"),
    ]
    .into_iter()
    .find_map(|(ext, mime)| lower.ends_with(ext).then_some(mime))
}

/// What a progress notification says about an output event.
pub fn progress_text(event: &Event) -> Option<String> {
    let text = match event {
        Event::Output { output, .. } | Event::Updated { output, .. } => match output {
            Output::Stream { text, .. } => text.clone(),
            Output::Error { ename, evalue, .. } => format!("{ename}: {evalue}"),
            Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. } => data
                .get("text/plain")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("[{}]", data.keys().cloned().collect::<Vec<_>>().join(", "))),
        },
        Event::Cleared => "[output cleared]".into(),
        Event::InputRequested(asked) => format!("[input requested: {}]", asked.prompt),
    };
    Some(text.chars().take(PROGRESS_TEXT).collect())
}

/// An execution's result as MCP content: each output in order (text, or an image for PNG/JPEG), then a
/// line on how it ended unless it simply succeeded; the whole result as structured content.
pub fn render(result: &ExecuteResult) -> CallToolResult {
    let mut content = Vec::new();
    // A refused prompt's KeyboardInterrupt is our doing; the closing line says what happened instead.
    let refused = result.error.as_ref().is_some_and(|e| e.ename == "InputRequired");
    for output in &result.outputs {
        if refused && matches!(output, Output::Error { .. }) {
            continue;
        }
        match output {
            Output::Stream { name, text } if name == "stderr" => {
                content.push(ContentBlock::text(format!("[stderr]\n{text}")))
            }
            Output::Stream { text, .. } => content.push(ContentBlock::text(text.clone())),
            Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. } => content.push(bundle(data)),
            Output::Error { ename, evalue, traceback } => {
                // Tracebacks carry terminal colours; a model reads them better plain.
                let trace = strip_ansi(&traceback.join("\n"));
                content.push(ContentBlock::text(format!("{ename}: {evalue}\n{trace}")));
            }
        }
    }
    let ending = match result.status {
        ExecStatus::Ok => None,
        ExecStatus::Error => result.error.as_ref().map(|e| format!("error: {}: {}", e.ename, e.evalue)),
        ExecStatus::Timeout => Some(format!(
            "timeout: the code ran past its time limit and was interrupted{}",
            if result.kernel_restarted { "; the kernel was restarted, its state is gone" } else { "" }
        )),
        ExecStatus::Killed => Some(format!("killed: {}", result.killed_reason.as_deref().unwrap_or("unknown"))),
    };
    let already_shown = result.status == ExecStatus::Error
        && result.outputs.iter().any(|o| matches!(o, Output::Error { .. }))
        && result.error.as_ref().is_some_and(|e| e.ename != "InputRequired");
    if let Some(ending) = ending.filter(|_| !already_shown) {
        content.push(ContentBlock::text(ending));
    }
    if result.truncated {
        content.push(ContentBlock::text("[output truncated: the output limit was reached]".to_owned()));
    }
    if let Some(network) = result.network.as_ref().filter(|n| !n.blocked.is_empty()) {
        let refused: Vec<String> =
            network.blocked.iter().map(|b| format!("{}:{} ({})", b.host, b.port, b.reason)).collect();
        content.push(ContentBlock::text(format!(
            "[network: refused {}; set_network can allow a host for this session]",
            refused.join(", ")
        )));
    }
    if content.is_empty() {
        content.push(ContentBlock::text("(no output)".to_owned()));
    }
    let mut rendered =
        if result.status == ExecStatus::Ok { CallToolResult::success(content) } else { CallToolResult::error(content) };
    rendered.structured_content = Some(to_value(result));
    rendered
}

/// A display or result: an image when it has PNG or JPEG, else its plain text (or which types it has).
fn bundle(data: &serde_json::Map<String, Value>) -> ContentBlock {
    for mime in ["image/png", "image/jpeg"] {
        if let Some(b64) = data.get(mime).and_then(Value::as_str) {
            // Jupyter may wrap base64 in lines; MCP wants it plain.
            return ContentBlock::image(b64.split_whitespace().collect::<String>(), mime);
        }
    }
    match data.get("text/plain").and_then(Value::as_str) {
        Some(text) => ContentBlock::text(text.to_owned()),
        None => ContentBlock::text(format!("[display: {}]", data.keys().cloned().collect::<Vec<_>>().join(", "))),
    }
}

/// A folder's listing: its names, one a line; the structured content has every entry.
pub fn listing(path: &str, listing: &Listing) -> CallToolResult {
    let value = to_value(listing);
    let names: Vec<String> = value["entries"]
        .as_array()
        .map(|e| e.iter().map(|e| e["name"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default();
    let text = if names.is_empty() { format!("{path} is empty") } else { names.join("\n") };
    structured(text, value, false)
}

/// An install's outcome, one line per package; a failed install is a failed call.
pub fn installed(report: &InstallReport) -> CallToolResult {
    let lines: Vec<String> = report
        .packages
        .iter()
        .map(|p| match (&p.version, &p.error) {
            (_, Some(error)) => format!("{}: failed: {error}", p.spec),
            (Some(version), None) => format!("{} {version} installed", p.name),
            (None, None) => format!("{} installed", p.name),
        })
        .collect();
    let text = if lines.is_empty() { "nothing to install".to_owned() } else { lines.join("\n") };
    structured(text, to_value(report), !report.ok)
}

/// A file read from a session: image content for an image, else its text, else base64; the structured
/// content has its path, size, encoding and content.
pub fn file(path: &str, bytes: &[u8]) -> CallToolResult {
    let size = bytes.len();
    let b64 = || base64::engine::general_purpose::STANDARD.encode(bytes);
    match image_mime(path) {
        Some(mime) => {
            let data = b64();
            let meta = json!({"path": path, "size": size, "mime": mime, "encoding": "base64", "content": data});
            let mut result = CallToolResult::success(vec![ContentBlock::image(data, mime)]);
            result.structured_content = Some(meta);
            result
        }
        None => match std::str::from_utf8(bytes) {
            Ok(text) => {
                let meta = json!({"path": path, "size": size, "encoding": "utf-8", "content": text});
                structured(text.to_owned(), meta, false)
            }
            Err(_) => {
                let data = b64();
                let meta = json!({"path": path, "size": size, "encoding": "base64", "content": data});
                structured(data, meta, false)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ErrorInfo;

    fn result(status: ExecStatus, outputs: Vec<Output>) -> ExecuteResult {
        ExecuteResult { status, outputs, ..ExecuteResult::killed("", 0) }
    }

    fn texts(r: &CallToolResult) -> Vec<String> {
        r.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect()
    }

    #[test]
    fn outputs_become_text_and_png_becomes_image_content_in_order() {
        let png = json!({"image/png": "iVBO\nRw==\n", "text/plain": "<Figure>"});
        let outputs = vec![
            Output::Stream { name: "stdout".into(), text: "hi\n".into() },
            Output::DisplayData { data: png.as_object().unwrap().clone(), metadata: Default::default() },
            Output::ExecuteResult {
                execution_count: Some(1),
                data: json!({"text/plain": "42"}).as_object().unwrap().clone(),
                metadata: Default::default(),
            },
        ];
        let r = render(&result(ExecStatus::Ok, outputs));
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.content.len(), 3);
        assert_eq!(r.content[0].as_text().unwrap().text, "hi\n");
        let image = r.content[1].as_image().expect("an image");
        assert_eq!((image.data.as_str(), image.mime_type.as_str()), ("iVBORw==", "image/png"));
        assert_eq!(r.content[2].as_text().unwrap().text, "42");
        assert_eq!(r.structured_content.as_ref().unwrap()["status"], "ok");
    }

    #[test]
    fn an_error_is_shown_once_without_colours_and_marks_the_call_failed() {
        let error = Output::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec!["\u{1b}[0;31mZeroDivisionError\u{1b}[0m: division by zero".into()],
        };
        let mut r = result(ExecStatus::Error, vec![error]);
        r.error =
            Some(ErrorInfo { ename: "ZeroDivisionError".into(), evalue: "division by zero".into(), traceback: vec![] });
        let rendered = render(&r);
        assert_eq!(rendered.is_error, Some(true));
        assert_eq!(texts(&rendered), vec!["ZeroDivisionError: division by zero\nZeroDivisionError: division by zero"]);
    }

    #[test]
    fn timeouts_and_refused_prompts_say_what_happened() {
        let timed_out = render(&result(ExecStatus::Timeout, vec![]));
        assert!(texts(&timed_out)[0].starts_with("timeout:"));
        let mut refused = result(
            ExecStatus::Error,
            vec![Output::Error { ename: "KeyboardInterrupt".into(), evalue: "".into(), traceback: vec![] }],
        );
        refused.error =
            Some(ErrorInfo { ename: "InputRequired".into(), evalue: "send stdin".into(), traceback: vec![] });
        assert!(texts(&render(&refused)).last().unwrap().contains("InputRequired: send stdin"));
    }

    #[test]
    fn progress_quotes_output_briefly() {
        let long = Event::Output {
            output: Output::Stream { name: "stdout".into(), text: "x".repeat(5000) },
            display_id: None,
        };
        assert_eq!(progress_text(&long).unwrap().len(), PROGRESS_TEXT);
        assert_eq!(progress_text(&Event::Cleared).unwrap(), "[output cleared]");
    }
}
