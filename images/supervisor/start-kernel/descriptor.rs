//! The image-local descriptor (/opt/kernelbox/kernel.json): where it is, reading it, and what
//! `--describe` prints of it. What its fields mean for a start is `kernel`'s.

use crate::json::{parse_json, Json};

const DEFAULT_DESCRIPTOR: &str = "/opt/kernelbox/kernel.json";
const DESCRIBE_KEYS: [&str; 5] = ["language", "display_name", "language_version", "transport", "interrupt_mode"];

/// Reads the descriptor (`KERNELBOX_DESCRIPTOR`, for tests on a host, overrides where it is).
pub fn load() -> Result<Json, String> {
    let descriptor = std::env::var("KERNELBOX_DESCRIPTOR").unwrap_or_else(|_| DEFAULT_DESCRIPTOR.to_owned());
    std::fs::read_to_string(&descriptor)
        .map_err(|e| e.to_string())
        .and_then(|t| parse_json(&t))
        .map_err(|e| format!("cannot read descriptor {}: {}", descriptor, e))
}

/// The language fields, indented, as the Python supervisor printed them.
pub fn describe(desc: &Json) -> String {
    let fields = DESCRIBE_KEYS.iter().map(|k| (k.to_string(), desc.get(k).cloned().unwrap_or(Json::Null))).collect();
    Json::Obj(fields).dump(Some(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_prints_like_python() {
        let d = parse_json(r#"{"language": "bash", "transport": "ipc", "argv": []}"#).unwrap();
        assert_eq!(
            describe(&d),
            "{\n  \"language\": \"bash\",\n  \"display_name\": null,\n  \"language_version\": null,\n  \
             \"transport\": \"ipc\",\n  \"interrupt_mode\": null\n}"
        );
    }
}
