//! The 0.38 jobs API (`comfy_execution/jobs.py` + its routes in `server.py`), absent on 0.3.64.
//!
//! Owns: `GET /api/jobs` (status / workflow filters, `sort_by` `created_at|execution_duration`,
//! `sort_order`, `limit`/`offset` pagination), `GET /api/jobs/{id}` (full fields), and the atomic
//! cancels `POST /api/jobs/{id}/cancel` and `POST /api/jobs/cancel {"job_ids": […]}` (C1–C3). A job
//! is a queue item (`pending`, `in_progress`) or a history entry (`completed`, `failed`, or
//! `cancelled` when its last message is `execution_interrupted`); `null` fields are left out, as
//! `prune_dict` does.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::Response;

use crate::json::{OMap, OValue};
use crate::queue::{HistoryEntry, QueueItem};
use crate::server::{AppState, json};

const ALL_STATUSES: &[&str] = &["pending", "in_progress", "completed", "failed", "cancelled"];

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let mut body = OMap::new();
    body.insert("error", OValue::str(message.into()));
    json(status, &body)
}

fn insert_some(map: &mut OMap, key: &str, value: Option<OValue>) {
    if let Some(v) = value.filter(|v| *v != OValue::Null) {
        map.insert(key, v);
    }
}

/// `create_time` and `workflow_id` (`extra_pnginfo.workflow.id`) of a prompt.
fn metadata(extra_data: &OMap) -> (Option<OValue>, Option<OValue>) {
    let create_time = extra_data.get("create_time").cloned();
    let workflow_id =
        extra_data.get("extra_pnginfo").and_then(|p| p.get("workflow")).and_then(|w| w.get("id")).cloned();
    (create_time, workflow_id)
}

fn workflow(item: &QueueItem) -> OValue {
    let mut w = OMap::new();
    w.insert("prompt", OValue::Object((*item.graph).clone()));
    w.insert("extra_data", OValue::Object((*item.extra_data).clone()));
    OValue::Object(w)
}

/// A job in the form the list and the detail route give it.
struct Job {
    status: &'static str,
    create_time: f64,
    duration: f64,
    workflow_id: Option<OValue>,
    body: OMap,
}

fn queue_job(item: &QueueItem, status: &'static str, detail: bool) -> Job {
    let (create_time, workflow_id) = metadata(&item.extra_data);
    let mut body = OMap::new();
    body.insert("id", OValue::str(item.prompt_id.clone()));
    body.insert("status", OValue::str(status));
    body.insert("priority", item.number.to_ovalue());
    insert_some(&mut body, "create_time", create_time.clone());
    body.insert("outputs_count", OValue::Number(0.into()));
    insert_some(&mut body, "workflow_id", workflow_id.clone());
    if detail {
        body.insert("workflow", workflow(item));
    }
    Job { status, create_time: number(create_time.as_ref()), duration: 0.0, workflow_id, body }
}

fn number(v: Option<&OValue>) -> f64 {
    match v {
        Some(OValue::Number(n)) => n.as_f64().unwrap_or(0.0),
        _ => 0.0,
    }
}

/// What a file's name says it is, as `jobs.py` classifies previewable outputs (C17: video by
/// extension or `format`).
fn media_type(key: &str, item: &OMap) -> &'static str {
    let name = item.get("filename").and_then(OValue::as_str).unwrap_or_default().to_ascii_lowercase();
    let format = item.get("format").and_then(OValue::as_str).unwrap_or_default();
    if format.starts_with("video/") || [".mp4", ".webm", ".mov", ".mkv", ".gif"].iter().any(|e| name.ends_with(e)) {
        "video"
    } else if key == "audio" {
        "audio"
    } else {
        "images"
    }
}

/// `(outputs_count, preview_output)`: every file entry counts; the preview is the first one,
/// tagged with its node and media type.
fn outputs_summary(outputs: &[(String, OValue)]) -> (u64, Option<OValue>) {
    let mut count = 0;
    let mut preview = None;
    for (node_id, ui) in outputs {
        let Some(ui) = ui.as_object() else { continue };
        for (key, items) in ui.iter() {
            let Some(items) = items.as_array() else { continue };
            for item in items {
                let Some(entry) = item.as_object().filter(|e| e.contains_key("filename")) else { continue };
                count += 1;
                if preview.is_none() {
                    let mut p = entry.clone();
                    p.insert("nodeId", OValue::str(node_id.clone()));
                    p.insert("mediaType", OValue::str(media_type(key, entry)));
                    preview = Some(OValue::Object(p));
                }
            }
        }
    }
    (count, preview)
}

fn history_job(id: &str, entry: &HistoryEntry, detail: bool) -> Job {
    let (create_time, workflow_id) = metadata(&entry.item.extra_data);
    let (mut start, mut end, mut error, mut interrupted) = (None, None, None, false);
    for (event, data) in &entry.status.messages {
        match event.as_str() {
            "execution_start" => start = data.get("timestamp").cloned(),
            "execution_success" | "execution_error" | "execution_interrupted" => {
                end = data.get("timestamp").cloned();
                if event == "execution_error" {
                    error = Some(data.clone());
                }
                interrupted = event == "execution_interrupted";
            }
            _ => {}
        }
    }
    let status = match entry.status.status_str {
        "error" if interrupted => "cancelled",
        "error" => "failed",
        _ => "completed",
    };
    let (count, preview) = outputs_summary(&entry.outputs);
    let duration = match (&start, &end) {
        (Some(s), Some(e)) => number(Some(e)) - number(Some(s)),
        _ => 0.0,
    };
    let mut body = OMap::new();
    body.insert("id", OValue::str(id));
    body.insert("status", OValue::str(status));
    body.insert("priority", entry.item.number.to_ovalue());
    insert_some(&mut body, "create_time", create_time.clone());
    insert_some(&mut body, "execution_start_time", start);
    insert_some(&mut body, "execution_end_time", end);
    insert_some(&mut body, "execution_error", error);
    body.insert("outputs_count", OValue::Number(count.into()));
    insert_some(&mut body, "preview_output", preview);
    insert_some(&mut body, "workflow_id", workflow_id.clone());
    if detail {
        let mut outputs = OMap::new();
        for (node, ui) in &entry.outputs {
            outputs.insert(node.clone(), ui.clone());
        }
        body.insert("outputs", OValue::Object(outputs));
        let status_json = serde_json::to_vec(&entry.status).ok().and_then(|b| OValue::parse(&b).ok());
        body.insert("execution_status", status_json.unwrap_or(OValue::Null));
        body.insert("workflow", workflow(&entry.item));
    }
    Job { status, create_time: number(create_time.as_ref()), duration, workflow_id, body }
}

/// `GET /api/jobs`.
pub async fn list(State(state): State<AppState>, Query(params): Query<HashMap<String, String>>) -> Response {
    let statuses: Vec<String> = match params.get("status").filter(|s| !s.is_empty()) {
        Some(value) => {
            let wanted: Vec<String> =
                value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
            let invalid: Vec<&str> = wanted.iter().map(String::as_str).filter(|s| !ALL_STATUSES.contains(s)).collect();
            if !invalid.is_empty() {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Invalid status value(s): {}. Valid values: {}",
                        invalid.join(", "),
                        ALL_STATUSES.join(", ")
                    ),
                );
            }
            wanted
        }
        None => ALL_STATUSES.iter().map(|s| s.to_string()).collect(),
    };
    // The names the local server accepts (C2); Cloud's `create_time`/`execution_time` are a 400.
    let sort_by = params.get("sort_by").map_or("created_at", String::as_str);
    if !matches!(sort_by, "created_at" | "execution_duration") {
        return error(StatusCode::BAD_REQUEST, "sort_by must be 'created_at' or 'execution_duration'");
    }
    let sort_order = params.get("sort_order").map_or("desc", String::as_str);
    if !matches!(sort_order, "asc" | "desc") {
        return error(StatusCode::BAD_REQUEST, "sort_order must be 'asc' or 'desc'");
    }
    let limit = match params.get("limit").map(|l| l.trim().parse::<i64>()) {
        None => None,
        Some(Ok(l)) if l > 0 => Some(l as usize),
        Some(Ok(_)) => return error(StatusCode::BAD_REQUEST, "limit must be a positive integer"),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be an integer"),
    };
    let offset = match params.get("offset").map(|o| o.trim().parse::<i64>()) {
        None => 0,
        Some(Ok(o)) => o.max(0) as usize,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "offset must be an integer"),
    };
    let workflow_id = params.get("workflow_id");

    let crate::queue::JobsView { running, pending, history } = state.shared.queue.jobs_view();
    let wants = |s: &str| statuses.iter().any(|w| w == s);
    let mut jobs: Vec<Job> = Vec::new();
    if wants("in_progress") {
        jobs.extend(running.iter().map(|i| queue_job(i, "in_progress", false)));
    }
    if wants("pending") {
        jobs.extend(pending.iter().map(|i| queue_job(i, "pending", false)));
    }
    jobs.extend(history.iter().map(|(id, e)| history_job(id, e, false)).filter(|j| wants(j.status)));
    if let Some(wf) = workflow_id {
        jobs.retain(|j| j.workflow_id.as_ref().is_some_and(|w| w.py_str() == *wf));
    }
    let key = |j: &Job| if sort_by == "created_at" { j.create_time } else { j.duration };
    // A stable sort like Python's `sorted(…, reverse=…)`: equal keys keep their list order.
    if sort_order == "desc" {
        jobs.sort_by(|a, b| key(b).total_cmp(&key(a)));
    } else {
        jobs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    }
    let total = jobs.len();
    let page: Vec<OValue> =
        jobs.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX)).map(|j| OValue::Object(j.body)).collect();
    let has_more = offset + page.len() < total;
    let mut pagination = OMap::new();
    pagination.insert("offset", OValue::Number((offset as u64).into()));
    pagination.insert("limit", limit.map_or(OValue::Null, |l| OValue::Number((l as u64).into())));
    pagination.insert("total", OValue::Number((total as u64).into()));
    pagination.insert("has_more", OValue::Bool(has_more));
    let mut body = OMap::new();
    body.insert("jobs", OValue::Array(page));
    body.insert("pagination", OValue::Object(pagination));
    json(StatusCode::OK, &body)
}

/// `GET /api/jobs/{id}`.
pub async fn get(State(state): State<AppState>, UrlPath(job_id): UrlPath<String>) -> Response {
    let crate::queue::JobsView { running, pending, history } = state.shared.queue.jobs_view();
    let found = running
        .iter()
        .find(|i| i.prompt_id == job_id)
        .map(|i| queue_job(i, "in_progress", true))
        .or_else(|| pending.iter().find(|i| i.prompt_id == job_id).map(|i| queue_job(i, "pending", true)))
        .or_else(|| history.iter().find(|(id, _)| *id == job_id).map(|(id, e)| history_job(id, e, true)));
    match found {
        Some(job) => json(StatusCode::OK, &job.body),
        None => error(StatusCode::NOT_FOUND, "Job not found"),
    }
}

fn is_job_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

fn cancel_one(state: &AppState, job_id: &str) -> bool {
    let shared = &state.shared;
    let cancelled = shared.queue.cancel(job_id, || shared.interrupt.trigger_for(job_id));
    tracing::info!(job_id, cancelled, "jobs cancel");
    cancelled
}

/// `POST /api/jobs/{id}/cancel`: `{"cancelled": bool}`, 200 also for unknown and finished jobs.
pub async fn cancel(State(state): State<AppState>, UrlPath(job_id): UrlPath<String>) -> Response {
    if !is_job_id(&job_id) {
        let mut body = OMap::new();
        body.insert("error", OValue::str("Invalid job id"));
        body.insert("invalid_ids", OValue::Array(vec![OValue::str(job_id)]));
        return json(StatusCode::BAD_REQUEST, &body);
    }
    let mut body = OMap::new();
    body.insert("cancelled", OValue::Bool(cancel_one(&state, &job_id)));
    json(StatusCode::OK, &body)
}

/// `POST /api/jobs/cancel {"job_ids": […]}`: best effort; malformed ids are a 400 naming them
/// (nothing is cancelled then).
pub async fn cancel_many(State(state): State<AppState>, body: Bytes) -> Response {
    let ids = match OValue::parse(&body) {
        Ok(OValue::Object(request)) => match request.get("job_ids") {
            Some(OValue::Array(ids)) => ids.clone(),
            _ => return error(StatusCode::BAD_REQUEST, "job_ids must be a list of job ids"),
        },
        _ => return error(StatusCode::BAD_REQUEST, "Request body must be a JSON object with job_ids"),
    };
    let invalid: Vec<OValue> =
        ids.iter().filter(|v| !v.as_str().is_some_and(is_job_id)).map(|v| OValue::str(v.py_str())).collect();
    if !invalid.is_empty() {
        let mut body = OMap::new();
        body.insert("error", OValue::str("Invalid job id(s)"));
        body.insert("invalid_ids", OValue::Array(invalid));
        return json(StatusCode::BAD_REQUEST, &body);
    }
    let mut cancelled = Vec::new();
    let mut not_cancelled = Vec::new();
    for id in ids.iter().filter_map(OValue::as_str) {
        if cancel_one(&state, id) {
            cancelled.push(OValue::str(id));
        } else {
            not_cancelled.push(OValue::str(id));
        }
    }
    let mut body = OMap::new();
    body.insert("cancelled", OValue::Array(cancelled));
    body.insert("not_cancelled", OValue::Array(not_cancelled));
    json(StatusCode::OK, &body)
}
