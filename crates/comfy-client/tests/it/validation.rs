//! Captured `POST /prompt` rejections become readable validation reports.

use serde_json::json;
use tdcomfy_comfy::ValidationReport;

use crate::captures;

fn report(case: &str) -> ValidationReport {
    let cases = captures::load("http_30_validation_errors.json");
    let exchange = &cases[case];
    let status = exchange["response"]["status"].as_u64().expect("status") as u16;
    ValidationReport::from_body(status, captures::response_json(exchange))
        .unwrap_or_else(|| panic!("{case}: no report"))
}

#[test]
fn http_30_rejections_read_like_instructions() {
    let expected = [
        (
            "custom_validation_failed (LoadImage missing file)",
            "node 1 (LoadImage): image: Invalid image file: missing_file.png",
        ),
        (
            "value_not_in_list + value_bigger_than_max (ImageScale)",
            "node 2 (ImageScale): upscale_method: 'bogus' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']; \
             node 2 (ImageScale): width: Value 999999 bigger than max of 16384",
        ),
        ("required_input_missing", "node 2 (ImageInvert): image: Required input is missing"),
        (
            "invalid_prompt (unknown class_type)",
            "Cannot execute because node NoSuchNode does not exist. (Node ID '#2')",
        ),
        ("prompt_no_outputs", "Prompt has no outputs"),
        ("no_prompt", "No prompt provided"),
        (
            "return_type_mismatch (MASK into IMAGE)",
            "node 3 (SaveImage): images: Return type mismatch between linked nodes \
             (received_type(MASK) mismatch input_type(IMAGE))",
        ),
        (
            "bad_linked_input",
            "node 2 (ImageInvert): image: Bad linked input, must be a length-2 list of [node_id, slot_index]",
        ),
    ];
    for (case, text) in expected {
        let report = report(case);
        assert_eq!(report.http_status, 400, "{case}");
        assert_eq!(report.to_string(), text, "{case}");
    }
}

#[test]
fn a_200_with_node_errors_is_a_rejection_and_a_clean_200_is_not() {
    let partial = report("invalid_input_type");
    assert_eq!(partial.http_status, 200);
    assert_eq!(
        partial.to_string(),
        "node 5 (CreateVideo): fps: Failed to convert an input value to a FLOAT value \
         (abc, could not convert string to float: 'abc')"
    );
    assert_eq!(partial.nodes[0].dependent_outputs, vec!["6"]);
    assert_eq!(partial.nodes[0].errors[0].received_value, Some(json!("abc")));

    let cases = captures::load("http_30_validation_errors.json");
    let clean = &cases["partial failure: one output invalid, others ok -> 200 with node_errors"];
    assert_eq!(ValidationReport::from_body(200, captures::response_json(clean)), None);
}

#[test]
fn run_95_ltxv_template_names_both_missing_models() {
    let run = captures::load("run_95_ltxv_template_validation.json");
    let report =
        ValidationReport::from_body(400, captures::response_json(&run["validate_without_models"])).expect("report");
    assert_eq!(
        report.to_string(),
        "node 38 (CLIPLoader): clip_name: 't5xxl_fp16.safetensors' not in []; \
         node 44 (CheckpointLoaderSimple): ckpt_name: 'ltx-video-2b-v0.9.5.safetensors' not in []"
    );
    assert_eq!(report.error_type, "prompt_outputs_failed_validation");
}

#[test]
fn newer_missing_node_type_and_odd_bodies_still_read_well() {
    let newer = json!({
        "error": {"type": "missing_node_type", "message": "Node 'LTXVFancy' not found. The custom node may not be installed.",
                  "details": "", "extra_info": {"node_id": "77", "class_type": "LTXVFancy", "node_title": "LTXV"}},
        "node_errors": {}
    });
    let report = ValidationReport::from_body(400, &newer).expect("report");
    assert_eq!(report.error_type, "missing_node_type");
    assert_eq!(
        report.to_string(),
        "node 77 (LTXVFancy, title \"LTXV\"): Node 'LTXVFancy' not found. The custom node may not be installed."
    );

    let string_error = json!({"error": "something broke"});
    assert_eq!(ValidationReport::from_body(400, &string_error).expect("report").to_string(), "something broke");
    assert_eq!(ValidationReport::from_body(400, &json!({"error": null, "node_errors": {}})), None);
    assert_eq!(ValidationReport::from_body(400, &json!([1, 2])), None);
}
