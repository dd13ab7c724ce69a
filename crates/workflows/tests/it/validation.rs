//! Parameter validation, as the broker runs it at submit time: errors name the parameter and
//! the limit it broke.

use serde_json::json;
use tdcomfy_workflows::{BindError, JobInputs};

use crate::support::{job, params, shipped, workflow};

fn ltxv() -> tdcomfy_workflows::Workflow {
    workflow("ltxv_image_to_video", shipped("ltxv_image_to_video"))
}

fn check(v: serde_json::Value) -> Result<(), BindError> {
    ltxv().validate_params(&params(v))
}

#[test]
fn valid_params_pass() {
    assert_eq!(check(json!({"frames": 9, "width": 768, "height": 512, "fps": 30.0, "steps": 1, "cfg": 0})), Ok(()));
}

#[test]
fn unknown_param_lists_the_known_ones() {
    let err = check(json!({"lenght": 97})).expect_err("refused");
    let BindError::UnknownParam { name, known } = &err else {
        panic!("expected UnknownParam, got {err:?}");
    };
    assert_eq!(name, "lenght");
    assert!(known.contains(&"frames".to_string()) && !known.contains(&"image".to_string()));
    let msg = err.to_string();
    assert!(msg.contains("`lenght`") && msg.contains("frames"), "{msg}");
}

#[test]
fn wrong_type_names_the_param_and_expected_type() {
    let err = check(json!({"frames": "97"})).expect_err("refused");
    assert_eq!(err.to_string(), "parameter `frames` must be an integer, got a JSON string");
    let err = check(json!({"frames": 96.5})).expect_err("refused");
    assert!(err.to_string().contains("must be an integer"), "{err}");
    let err = check(json!({"prompt": 5})).expect_err("refused");
    assert!(err.to_string().contains("`prompt` must be a string"), "{err}");
}

#[test]
fn below_minimum_names_the_limit() {
    let err = check(json!({"width": 32})).expect_err("refused");
    assert!(matches!(err, BindError::TooSmall { .. }), "{err:?}");
    assert_eq!(err.to_string(), "parameter `width` = 32 is below the minimum 64");
    let err = check(json!({"fps": 0})).expect_err("refused");
    assert!(err.to_string().contains("`fps` = 0 is below the minimum 1"), "{err}");
    let err = check(json!({"seed": -1})).expect_err("refused");
    assert!(err.to_string().contains("`seed` = -1 is below the minimum 0"), "{err}");
}

#[test]
fn above_maximum_names_the_limit() {
    let err = check(json!({"steps": 10001})).expect_err("refused");
    assert_eq!(err.to_string(), "parameter `steps` = 10001 is above the maximum 10000");
    let err = check(json!({"cfg": 100.5})).expect_err("refused");
    assert!(err.to_string().contains("above the maximum 100"), "{err}");
    let err = check(json!({"fps": 240})).expect_err("refused");
    assert!(err.to_string().contains("`fps` = 240 is above the maximum 120"), "{err}");
}

#[test]
fn off_step_values_suggest_the_nearest_valid_ones() {
    let err = check(json!({"frames": 96})).expect_err("refused");
    assert_eq!(
        err.to_string(),
        "parameter `frames` = 96 is not allowed: values are 9 + a multiple of 8 (try 89 or 97)"
    );
    let err = check(json!({"width": 300})).expect_err("refused");
    assert!(err.to_string().contains("try 288 or 320"), "{err}");
    let err = check(json!({"out_width": 511})).expect_err("refused");
    assert!(err.to_string().contains("try 510 or 512"), "{err}");
}

#[test]
fn image_cannot_be_a_param() {
    let err = check(json!({"image": "x.png"})).expect_err("refused");
    assert!(matches!(err, BindError::ReservedParam { .. }), "{err:?}");
    assert!(err.to_string().contains("uploaded frame"), "{err}");
}

#[test]
fn bind_rejects_what_validate_rejects() {
    let inputs = JobInputs { params: params(json!({"frames": 96})), ..job("job-v") };
    assert!(matches!(ltxv().bind(&inputs), Err(BindError::NotOnStep { .. })));
}
