//! Finishing the OpenAPI document with what the per-route annotations cannot say: which operations
//! need a bearer token under this broker's configuration, and the bounds the handlers enforce on
//! request types that live in `tdcomfy-api` (whose derives know nothing of this server's limits).

use serde_json::{Value, json};

use crate::config::BrokerConfig;

/// Bounds the broker enforces on fields of shared request types, as JSON-pointer and schema
/// keywords. Each pointer must exist; a unit test keeps them from drifting from `tdcomfy-api`.
const FIELD_BOUNDS: &[(&str, &[(&str, BoundValue)])] = &[
    (
        "/components/schemas/LeaseRequest/properties/worker_id",
        &[
            ("minLength", BoundValue::Int(1)),
            ("maxLength", BoundValue::Int(128)),
            ("pattern", BoundValue::Text(VISIBLE_ASCII)),
        ],
    ),
    (
        "/components/schemas/LeaseRequest/properties/wait",
        &[("minimum", BoundValue::Int(0)), ("maximum", BoundValue::Int(60))],
    ),
    (
        "/components/schemas/Progress/properties/value",
        &[("minimum", BoundValue::Int(0)), ("maximum", BoundValue::Int(1))],
    ),
];

/// One or more visible ASCII characters: what `worker_id` may hold. (Header values are bounded in
/// the route annotations by `^[!-~]([ -~]*[!-~])?$`: printable ASCII, which is what axum reads as
/// text, without the outer spaces HTTP strips.)
const VISIBLE_ASCII: &str = "^[!-~]+$";

#[derive(Clone, Copy)]
enum BoundValue {
    Int(i64),
    Text(&'static str),
}

impl BoundValue {
    fn to_json(self) -> Value {
        match self {
            BoundValue::Int(n) => json!(n),
            BoundValue::Text(s) => json!(s),
        }
    }
}

/// Applies the token requirements, workflow names and prompt limit of `config`, and the shared
/// types' bounds, to `spec`.
pub fn finish(spec: &mut Value, config: &BrokerConfig) {
    for (pointer, bounds) in FIELD_BOUNDS {
        if let Some(Value::Object(schema)) = spec.pointer_mut(pointer) {
            for (key, value) in *bounds {
                schema.insert((*key).to_owned(), value.to_json());
            }
        }
    }
    if let Some(Value::Object(form)) = spec.pointer_mut("/components/schemas/SubmitForm/properties") {
        let mut workflows = vec![String::new()];
        workflows.extend(config.workflows.names().into_iter().map(str::to_owned));
        if let Some(Value::Object(workflow)) = form.get_mut("workflow") {
            workflow.insert("enum".into(), json!(workflows));
        }
        for field in ["prompt", "negative_prompt"] {
            if let Some(Value::Object(prompt)) = form.get_mut(field) {
                prompt.insert("maxLength".into(), json!(config.max_prompt_chars));
            }
        }
    }
    let worker_needs_token = config.worker_token.is_some() || config.api_token.is_some();
    let client_needs_token = config.api_token.is_some();
    let Some(Value::Object(paths)) = spec.get_mut("paths") else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let needs_token = match path.as_str() {
            "/health" => false,
            p if p.starts_with("/worker/") => worker_needs_token,
            _ => client_needs_token,
        };
        if !needs_token {
            continue;
        }
        let Some(item) = item.as_object_mut() else { continue };
        for operation in item.values_mut().filter_map(Value::as_object_mut) {
            operation.insert("security".into(), json!([{ "bearer": [] }]));
            if let Some(Value::Object(responses)) = operation.get_mut("responses") {
                responses.insert("401".into(), unauthorized_response());
            }
        }
    }
}

fn unauthorized_response() -> Value {
    json!({
        "description": "Missing or wrong token",
        "headers": { "WWW-Authenticate": { "schema": { "type": "string" } } },
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_names_a_field_of_the_document() {
        let (_, openapi) = super::super::api_router();
        let spec = serde_json::to_value(&openapi).expect("document serializes");
        for (pointer, _) in FIELD_BOUNDS {
            assert!(spec.pointer(pointer).is_some_and(Value::is_object), "{pointer} is not in the document");
        }
    }
}
