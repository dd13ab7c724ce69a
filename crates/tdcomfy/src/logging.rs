//! Logging: human-readable text (colours only on a terminal) or one JSON object per line.
//!
//! JSON lines are flat: the event's fields and those of every span it is in (a worker's job span
//! carries `job_id`, `attempt` and `worker`) sit beside `timestamp`, `level`, `target` and
//! `message`, so `jq 'select(.job_id == "…")'` finds every line of a job.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `LOG_FORMAT` / `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people; coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for journald, Loki, jq.
    Json,
}

/// Installs the global subscriber writing to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // A log file, a pipe or journald would store escape codes as text: colour only a terminal,
        // and never when NO_COLOR asks not to (https://no-color.org).
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal() && !no_color()).init(),
        LogFormat::Json => builder.fmt_fields(JsonFields::new()).event_format(FlatJson).init(),
    }
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Formats an event as one flat JSON object.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        // Outer spans first, so an inner span's field (and then the event's own) wins a clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    merge(&mut line, fields.as_str());
                }
            }
        }
        let mut fields = String::new();
        ctx.format_fields(Writer::new(&mut fields), event)?;
        merge(&mut line, &fields);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Adds the fields of `json` (an object written by [`JsonFields`]) to `line`.
fn merge(line: &mut serde_json::Map<String, serde_json::Value>, json: &str) {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(json) {
        line.extend(fields);
    }
}
