//! Reading the broker's Server-Sent Events (`/events`, `/jobs/{id}/events`) as [`JobEvent`]s.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tdcomfy_api::JobEvent;

/// The job events of one SSE response.
pub struct JobEvents {
    stream: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    decoder: SseDecoder,
}

impl JobEvents {
    /// Reads events from `response` (a `text/event-stream`).
    pub fn new(response: reqwest::Response) -> JobEvents {
        JobEvents { stream: response.bytes_stream().boxed(), decoder: SseDecoder::default() }
    }

    /// The next event of any kind as `(event name, data)`, `resync` and `preview` included;
    /// `None` when the stream ends.
    pub async fn next_raw(&mut self) -> anyhow::Result<Option<(String, String)>> {
        loop {
            if let Some(event) = self.decoder.next_event() {
                return Ok(Some(event));
            }
            match self.stream.next().await {
                Some(chunk) => self.decoder.push(&chunk?),
                None => return Ok(None),
            }
        }
    }

    /// The next event; `None` when the stream ends. Keep-alive comments are skipped.
    pub async fn next(&mut self) -> anyhow::Result<Option<JobEvent>> {
        loop {
            if let Some(data) = self.decoder.next_data() {
                if data.is_empty() {
                    continue; // an event without a payload (`data:` alone)
                }
                return Ok(Some(serde_json::from_str(&data)?));
            }
            match self.stream.next().await {
                Some(chunk) => self.decoder.push(&chunk?),
                None => return Ok(None),
            }
        }
    }
}

/// The `text/event-stream` format (WHATWG HTML, "Server-sent events"), decoded from bytes.
///
/// Bytes are kept until a whole line arrived, so a UTF-8 character split across reads is decoded
/// once, whole. Lines end with LF, CRLF or CR; `data` lines of one event are joined with `\n`.
#[derive(Default)]
struct SseDecoder {
    buf: Vec<u8>,
    /// The `data` lines of the event being read, if it has any.
    data: Option<String>,
    /// The `event` field of the event being read.
    event: Option<String>,
}

impl SseDecoder {
    /// Appends bytes just read.
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The `data` of the next complete job event, if one is buffered: a `resync` is no job event
    /// (on a job's stream the snapshot that follows it is), nor is a `preview` (no job state).
    fn next_data(&mut self) -> Option<String> {
        loop {
            let (event, data) = self.next_event()?;
            if event != "resync" && event != "preview" {
                return Some(data);
            }
        }
    }

    /// The name and `data` of the next complete event, if one is buffered.
    fn next_event(&mut self) -> Option<(String, String)> {
        let mut start = 0;
        let mut found = None;
        while let Some(offset) = self.buf[start..].iter().position(|&b| b == b'\n' || b == b'\r') {
            let end = start + offset;
            let next = match self.buf[end] {
                b'\r' if end + 1 == self.buf.len() => break, // CR or CRLF? wait for the next byte
                b'\r' if self.buf[end + 1] == b'\n' => end + 2,
                _ => end + 1,
            };
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            start = next;
            if let Some(data) = self.line(&line) {
                found = Some(data);
                break;
            }
        }
        self.buf.drain(..start);
        found
    }

    /// Processes one line; returns the event's name and data when the line ends an event.
    fn line(&mut self, line: &str) -> Option<(String, String)> {
        if line.is_empty() {
            let (event, data) = (self.event.take(), self.data.take());
            return data.map(|data| (event.unwrap_or_else(|| "message".to_owned()), data));
        }
        if line.starts_with(':') {
            return None; // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "event" {
            self.event = Some(value.to_owned());
        }
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(data) = decoder.next_data() {
                out.push(data);
            }
        }
        out
    }

    #[test]
    fn sse_preview_events_are_not_job_events() {
        let stream = b"event: preview\ndata: {\"type\":\"preview\"}\n\nevent: progress\ndata: {\"x\":2}\n\n";
        assert_eq!(decode(&[stream]), ["{\"x\":2}"]);
    }

    #[test]
    fn sse_resync_events_are_not_job_events() {
        let stream = b"event: resync\nid: b-3\ndata: {\"type\":\"resync\"}\n\nevent: snapshot\ndata: {\"x\":1}\n\n";
        assert_eq!(decode(&[stream]), ["{\"x\":1}"]);
    }

    #[test]
    fn sse_a_multi_byte_character_split_across_reads_arrives_whole() {
        let event = "data: {\"prompt\":\"ein Fluss im Morgengrauen, 霧 🌊\"}\n\n".as_bytes();
        // Split inside every multi-byte character in turn: each read ends mid-character somewhere.
        for cut in 1..event.len() {
            assert_eq!(
                decode(&[&event[..cut], &event[cut..]]),
                ["{\"prompt\":\"ein Fluss im Morgengrauen, 霧 🌊\"}"],
                "split at byte {cut}"
            );
        }
        // One byte per read.
        let bytes: Vec<&[u8]> = event.chunks(1).collect();
        assert_eq!(decode(&bytes), ["{\"prompt\":\"ein Fluss im Morgengrauen, 霧 🌊\"}"]);
    }

    #[test]
    fn sse_multi_line_data_fields_are_joined_with_newlines() {
        assert_eq!(
            decode(&[b"event: job\ndata: first line\ndata:second line\ndata\ndata:  two spaces\n\n"]),
            ["first line\nsecond line\n\n two spaces"]
        );
        // JSON split over data lines stays JSON only when the lines are joined with "\n".
        assert_eq!(decode(&[b"data: [12\ndata: 3]\n\n"]), ["[12\n3]"]);
    }

    #[test]
    fn sse_crlf_line_endings_comments_and_empty_events() {
        assert_eq!(
            decode(&[b": keep-alive\r\n\r\nid: 7\r\ndata: {\"a\":1}\r\n\r\n", b"event: ping\n\n"]),
            ["{\"a\":1}"]
        );
        // Split between CR and LF, and an event whose blank line has not arrived yet.
        assert_eq!(decode(&[b"data: x\r", b"\n\r", b"\ndata: pending\n"]), ["x"]);
    }
}
