//! The workflow directory: every `*.json` file is a workflow named by its file stem. Loading
//! checks all of them (and the node map) and either returns a complete registry or one report
//! listing every problem, so the broker refuses to start instead of failing jobs later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{BindError, Problem, WorkflowError};
use crate::node_map::NodeMap;
use crate::workflow::{Workflow, WorkflowInfo};

/// All loaded workflows plus which one is the default.
#[derive(Debug, Clone)]
pub struct WorkflowRegistry {
    dir: PathBuf,
    default: String,
    workflows: BTreeMap<String, Workflow>,
}

impl WorkflowRegistry {
    /// Loads every `*.json` in `dir`. `default` is a workflow name (a trailing `.json` is
    /// accepted too); `overrides` is the node map. Fails with a report naming each file,
    /// parameter and reason if anything cannot be resolved.
    pub fn load(dir: &Path, default: &str, overrides: &NodeMap) -> Result<WorkflowRegistry, WorkflowError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WorkflowError::Io { path, source }
        };
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let is_json = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("json"));
            if !is_json || !path.is_file() {
                continue;
            }
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                files.push((stem.to_string(), path.clone()));
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(WorkflowError::NoWorkflows { dir: dir.to_path_buf() });
        }

        let default = default.strip_suffix(".json").unwrap_or(default).to_string();
        let available: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        if !available.contains(&default) {
            return Err(WorkflowError::UnknownDefault { default, dir: dir.to_path_buf(), available });
        }

        let mut problems = Vec::new();
        for scope in overrides.scopes() {
            if !available.iter().any(|n| n == scope) {
                problems.push(Problem {
                    location: "node map".to_string(),
                    param: None,
                    reason: format!(
                        "it has entries for workflow `{scope}`, but {} has no {scope}.json (available: {})",
                        dir.display(),
                        available.join(", ")
                    ),
                });
            }
        }

        let mut workflows = BTreeMap::new();
        for (name, path) in files {
            let location = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    problems.push(Problem { location, param: None, reason: format!("cannot read the file: {e}") });
                    continue;
                }
            };
            // Windows editors (Notepad) save UTF-8 with a BOM, which serde_json rejects.
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            let graph: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(Problem { location, param: None, reason: format!("not valid JSON: {e}") });
                    continue;
                }
            };
            let bindings = overrides.for_workflow(&name, name == default);
            match Workflow::build(&name, graph, &bindings) {
                Ok(workflow) => {
                    workflows.insert(name, workflow);
                }
                Err(found) => problems.extend(found.into_iter().map(|(param, reason)| Problem {
                    location: location.clone(),
                    param,
                    reason,
                })),
            }
        }

        if !problems.is_empty() {
            return Err(WorkflowError::Invalid { problems });
        }
        Ok(WorkflowRegistry { dir: dir.to_path_buf(), default, workflows })
    }

    /// The directory the workflows were loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The workflow called `name`.
    pub fn get(&self, name: &str) -> Option<&Workflow> {
        self.workflows.get(name)
    }

    /// The workflow a job asked for, or the default when it named none; an unknown name is the
    /// client's error (HTTP 400).
    pub fn select(&self, name: Option<&str>) -> Result<&Workflow, BindError> {
        let name = name.unwrap_or(&self.default);
        self.workflows.get(name).ok_or_else(|| BindError::UnknownWorkflow {
            name: name.to_string(),
            known: self.workflows.keys().cloned().collect(),
        })
    }

    /// The default workflow's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// The default workflow.
    pub fn default_workflow(&self) -> &Workflow {
        // Invariant from `load`: the default is one of the workflows and the map is non-empty.
        match self.workflows.get(&self.default) {
            Some(w) => w,
            None => self.workflows.values().next().expect("a loaded registry holds at least one workflow"),
        }
    }

    /// All workflow names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }

    /// Every workflow with its parameters, as served by `GET /workflows`.
    pub fn describe(&self) -> Vec<WorkflowInfo> {
        self.workflows.values().map(|w| w.describe(w.name() == self.default)).collect()
    }
}
