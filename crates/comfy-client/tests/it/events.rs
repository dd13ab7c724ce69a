//! Every WebSocket frame of every capture parses to the variant its `type` names.

use bytes::Bytes;
use serde_json::Value;
use tdcomfy_comfy::{ComfyEvent, PreviewFormat};

use crate::captures;

/// Collects every recorded frame (`{"frame": "text"|"binary", …}`) anywhere in a capture.
fn frames(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Object(map) if map.contains_key("frame") => out.push(value.clone()),
        Value::Object(map) => map.values().for_each(|v| frames(v, out)),
        Value::Array(items) => items.iter().for_each(|v| frames(v, out)),
        _ => {}
    }
}

fn all_frames() -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for prefix in ["run_", "ws_", "http_"] {
        for name in captures::names(prefix) {
            let mut found = Vec::new();
            frames(&captures::load(&name), &mut found);
            all.extend(found.into_iter().map(|f| (name.clone(), f)));
        }
    }
    all
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

/// Rebuilds a binary frame from its recorded metadata (the captures keep headers, not payloads).
fn rebuild_binary(frame: &Value) -> Vec<u8> {
    let len = frame["len"].as_u64().expect("len") as usize;
    match frame["event_type"].as_u64() {
        Some(1) => {
            let mut bytes = decode_hex(frame["first24_hex"].as_str().expect("hex"));
            bytes.resize(len, 0);
            bytes
        }
        Some(4) => {
            let meta = serde_json::to_vec(&frame["metadata"]).expect("meta");
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&4u32.to_be_bytes());
            bytes.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&meta);
            bytes.extend_from_slice(&decode_hex(frame["image_magic_hex"].as_str().expect("magic")));
            bytes.resize(bytes.len() + 64, 0);
            bytes
        }
        other => panic!("unexpected binary type {other:?}"),
    }
}

fn variant_matches(kind: &str, event: &ComfyEvent) -> bool {
    matches!(
        (kind, event),
        ("status", ComfyEvent::Status { .. })
            | ("execution_start", ComfyEvent::ExecutionStart { .. })
            | ("execution_cached", ComfyEvent::ExecutionCached { .. })
            | ("executing", ComfyEvent::Executing { .. })
            | ("progress", ComfyEvent::Progress { .. })
            | ("progress_state", ComfyEvent::ProgressState { .. })
            | ("executed", ComfyEvent::Executed { .. })
            | ("execution_success", ComfyEvent::ExecutionSuccess { .. })
            | ("execution_error", ComfyEvent::ExecutionError(_))
            | ("execution_interrupted", ComfyEvent::ExecutionInterrupted(_))
            | ("feature_flags", ComfyEvent::FeatureFlags(_))
    )
}

#[test]
fn every_captured_text_frame_parses_to_its_variant() {
    let mut checked = 0;
    for (file, frame) in all_frames().into_iter().filter(|(_, f)| f["frame"] == "text") {
        let msg = &frame["msg"];
        let kind = msg["type"].as_str().expect("type");
        let event =
            ComfyEvent::from_text(&msg.to_string()).unwrap_or_else(|e| panic!("{file}: {kind} did not parse: {e}"));
        assert!(variant_matches(kind, &event), "{file}: {kind} parsed as {event:?}");
        assert_eq!(event.prompt_id(), msg["data"]["prompt_id"].as_str(), "{file}: {kind} prompt id");
        checked += 1;
    }
    // 265 text frames are recorded; a much lower count means the walk broke.
    assert!(checked >= 260, "only {checked} text frames found");
}

#[test]
fn captured_event_payloads_are_read_correctly() {
    let run = captures::load("run_10_invert_first.json");
    let seq = run["ws_sequence"].as_array().expect("sequence");
    let events: Vec<ComfyEvent> =
        seq.iter().map(|f| ComfyEvent::from_text(&f["msg"].to_string()).expect("parse")).collect();
    let id = captures::prompt_id(&run);
    assert!(matches!(&events[0], ComfyEvent::Status { queue_remaining: Some(1), .. }));
    let executing: Vec<Option<String>> = events
        .iter()
        .filter_map(|e| match e {
            ComfyEvent::Executing { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        executing,
        vec![Some("1".into()), Some("2".into()), Some("3".into()), None],
        "node order, then the final executing(null)"
    );
    let executed = events
        .iter()
        .find_map(|e| match e {
            ComfyEvent::Executed { node, output, prompt_id, .. } => Some((node, output, prompt_id)),
            _ => None,
        })
        .expect("executed");
    assert_eq!(executed.0, "3");
    assert_eq!(executed.2.as_deref(), Some(id.as_str()));
    let files = executed.1.as_ref().expect("output").files("3");
    assert_eq!(files[0].filename, "invert_00001_.png");

    let interrupted = captures::load("run_60_interrupt.json")["ws_sequence"]
        .as_array()
        .expect("seq")
        .iter()
        .map(|f| ComfyEvent::from_text(&f["msg"].to_string()).expect("parse"))
        .find_map(|e| match e {
            ComfyEvent::ExecutionInterrupted(info) => Some(info),
            _ => None,
        })
        .expect("interrupt event");
    assert_eq!(interrupted.node_id.as_deref(), Some("2"));
    assert_eq!(interrupted.node_type.as_deref(), Some("SlowPassthrough"));

    let error = captures::load("run_40_execution_error_corrupt_image.json")["ws_sequence"]
        .as_array()
        .expect("seq")
        .iter()
        .map(|f| ComfyEvent::from_text(&f["msg"].to_string()).expect("parse"))
        .find_map(|e| match e {
            ComfyEvent::ExecutionError(info) => Some(info),
            _ => None,
        })
        .expect("error event");
    assert_eq!(error.exception_type, "PIL.UnidentifiedImageError");
    assert_eq!(error.node_type.as_deref(), Some("LoadImage"));
    assert_eq!(error.traceback.len(), 7);
    assert!(!error.exception_message.ends_with('\n'));
}

#[test]
fn reconnect_replay_without_prompt_id_parses() {
    let misc = captures::load("http_99_misc.json");
    let replay = &misc["reconnect_same_clientId_first_msgs"][1]["msg"];
    let event = ComfyEvent::from_text(&replay.to_string()).expect("parse");
    assert_eq!(event, ComfyEvent::Executing { prompt_id: None, node: Some("2".into()), display_node: None });
    let first = ComfyEvent::from_text(&misc["ws_without_clientId_first_msg"].to_string()).expect("parse");
    assert!(matches!(first, ComfyEvent::Status { queue_remaining: Some(0), sid: Some(sid) } if sid.len() == 32));
}

#[test]
fn every_captured_binary_frame_parses_to_a_preview() {
    let mut checked = 0;
    for (file, frame) in all_frames().into_iter().filter(|(_, f)| f["frame"] == "binary") {
        let bytes = Bytes::from(rebuild_binary(&frame));
        let event = ComfyEvent::from_binary(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let ComfyEvent::Preview(preview) = event else { panic!("{file}: binary frame parsed as {event:?}") };
        let expected = match frame["image_format"].as_str() {
            Some("JPEG") => PreviewFormat::Jpeg,
            Some("PNG") => PreviewFormat::Png,
            other => panic!("{file}: unexpected format {other:?}"),
        };
        assert_eq!(preview.format, expected, "{file}");
        let magic = decode_hex(frame["image_magic_hex"].as_str().expect("magic"));
        assert!(preview.image.starts_with(&magic), "{file}: image bytes start after the header");
        if frame["event_type"] == 4 {
            let meta = preview.meta.expect("type 4 carries metadata");
            assert_eq!(meta.prompt_id.as_deref(), frame["metadata"]["prompt_id"].as_str());
            assert_eq!(meta.node_id.as_deref(), Some("2"));
        } else {
            assert_eq!(preview.meta, None);
        }
        checked += 1;
    }
    assert_eq!(checked, 9, "5 type-1 and 4 type-4 frames are recorded");
}

#[test]
fn progress_text_frames_and_unknown_types_are_handled() {
    let mut frame = Vec::new();
    frame.extend_from_slice(&3u32.to_be_bytes());
    frame.extend_from_slice(&2u32.to_be_bytes());
    frame.extend_from_slice(b"72step 3 of 30");
    let event = ComfyEvent::from_binary(&Bytes::from(frame)).expect("type 3");
    assert_eq!(event, ComfyEvent::ProgressText { node_id: "72".into(), text: "step 3 of 30".into() });

    let unknown = ComfyEvent::from_binary(&Bytes::from_static(&[0, 0, 0, 9, 1, 2])).expect("unknown binary");
    assert_eq!(unknown, ComfyEvent::Unknown { kind: "binary:9".into() });
    let custom = ComfyEvent::from_text(r#"{"type":"crystools.monitor","data":{"cpu":3}}"#).expect("custom");
    assert_eq!(custom, ComfyEvent::Unknown { kind: "crystools.monitor".into() });

    // Extra fields from newer servers are ignored.
    let newer = ComfyEvent::from_text(
        r#"{"type":"executing","data":{"node":"5","display_node":"5","prompt_id":"p","workflow_id":"w"}}"#,
    )
    .expect("newer executing");
    assert_eq!(newer.prompt_id(), Some("p"));
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    for text in ["", "not json", "{}", r#"{"type":"progress","data":{"value":"x"}}"#, "[1,2]"] {
        assert!(ComfyEvent::from_text(text).is_err(), "{text:?} should not parse");
    }
    for bytes in
        [&[][..], &[0, 0, 0, 1][..], &[0, 0, 0, 4, 0, 0, 0, 50, b'{'][..], &[0, 0, 0, 3, 255, 255, 255, 255][..]]
    {
        assert!(ComfyEvent::from_binary(&Bytes::copy_from_slice(bytes)).is_err(), "{bytes:?}");
    }
}
