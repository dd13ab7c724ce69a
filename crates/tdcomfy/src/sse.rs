//! Reading the broker's Server-Sent Events (`/events`, `/jobs/{id}/events`) as [`JobEvent`]s.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tdcomfy_api::JobEvent;

/// The job events of one SSE response.
pub struct JobEvents {
    stream: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl JobEvents {
    /// Reads events from `response` (a `text/event-stream`).
    pub fn new(response: reqwest::Response) -> JobEvents {
        JobEvents { stream: response.bytes_stream().boxed(), buf: String::new() }
    }

    /// The next event; `None` when the stream ends. Keep-alive comments are skipped.
    pub async fn next(&mut self) -> anyhow::Result<Option<JobEvent>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: String = block.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                // A `resync` is no job event; on a job's stream the snapshot it comes with is.
                if data.is_empty() || block.lines().any(|l| l.trim_end() == "event: resync") {
                    continue;
                }
                return Ok(Some(serde_json::from_str(&data)?));
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk?)),
                None => return Ok(None),
            }
        }
    }
}
