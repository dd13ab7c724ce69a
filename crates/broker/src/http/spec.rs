//! Finishing the OpenAPI document with what the per-route annotations cannot know: which
//! operations need a bearer token under this broker's configuration, which answer 403 (browser
//! origins, worker routes without a token), the loaded workflow names and the configured prompt
//! limit.

use serde_json::{Value, json};

use crate::config::BrokerConfig;

/// Applies the token requirements, workflow names and prompt limit of `config` to `spec`.
pub fn finish(spec: &mut Value, config: &BrokerConfig) {
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
    let local_workers_only = !worker_needs_token;
    for (path, item) in paths.iter_mut() {
        let worker_route = path.starts_with("/worker/");
        let push_route = path == "/events" || path == "/ws" || path == "/jobs/{id}/events";
        if let Some(item) = item.as_object_mut() {
            for (method, operation) in item.iter_mut() {
                let mutating = matches!(method.as_str(), "post" | "put" | "delete" | "patch");
                let origin_checked = mutating || push_route;
                let loopback_checked = worker_route && local_workers_only;
                if !(origin_checked || loopback_checked) {
                    continue;
                }
                if let Some(Value::Object(responses)) = operation.get_mut("responses") {
                    responses.insert("403".into(), forbidden_response(origin_checked, loopback_checked));
                }
            }
        }
        let needs_token = match path.as_str() {
            "/health" => false,
            "/metrics" => client_needs_token || config.metrics_token.is_some(),
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

fn forbidden_response(origin: bool, loopback: bool) -> Value {
    let description = match (origin, loopback) {
        (true, true) => {
            "A browser page whose Origin is not the broker's own nor in ALLOWED_ORIGINS (origin_not_allowed), \
             or a worker on another machine while WORKER_TOKEN is not set (worker_token_required)"
        }
        (true, false) => {
            "A browser page whose Origin is not the broker's own nor in ALLOWED_ORIGINS (origin_not_allowed)"
        }
        _ => "A worker on another machine while WORKER_TOKEN is not set (worker_token_required)",
    };
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
    })
}

fn unauthorized_response() -> Value {
    json!({
        "description": "Missing or wrong token",
        "headers": { "WWW-Authenticate": { "schema": { "type": "string" } } },
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
    })
}
