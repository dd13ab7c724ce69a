//! Loading of the captured ComfyUI transcripts in `tests/fixtures/captures`.

use std::path::PathBuf;

use serde_json::Value;

/// Directory holding the captures.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/captures")
}

/// Parses one capture file.
pub fn load(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Every capture file name matching `prefix*.json`, sorted.
pub fn names(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .expect("captures dir")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix) && name.ends_with(".json"))
        .collect();
    names.sort();
    names
}

/// The response JSON of a `{request, response}` exchange.
pub fn response_json(exchange: &Value) -> &Value {
    &exchange["response"]["json"]
}

/// The history entry body of a run capture (`{"<id>": entry}`).
pub fn history_body(run: &Value) -> &Value {
    response_json(&run["history"])
}

/// The prompt id a run capture was queued under.
pub fn prompt_id(run: &Value) -> String {
    response_json(&run["post_prompt"])["prompt_id"].as_str().expect("prompt_id in capture").to_owned()
}
