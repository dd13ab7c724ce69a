//! Files beside the database: job inputs and results.
//!
//! Bytes arrive as streams and go to disk chunk by chunk (never whole in memory), first under a
//! temporary name in `tmp/`, then synced and renamed into place, with the directory synced after the
//! rename. A reader therefore sees either no file or a complete one, and a crash leaves at most a
//! stray temporary file, which [`Blobs::open`] sweeps away.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tdcomfy_api::JobId;
use tokio::io::AsyncWriteExt;

/// Which file of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// The frame the client sent.
    Input,
    /// The video (or image) the worker produced.
    Result,
}

/// How writing a stream to disk failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The stream was longer than the caller's limit (bytes).
    #[error("more than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The sender's stream failed (client went away, malformed body).
    #[error("the upload was interrupted: {0}")]
    Source(String),
    /// The disk failed.
    #[error("disk error: {0}")]
    Io(#[from] io::Error),
}

/// A stream written to a temporary file, not yet visible under its final name.
#[derive(Debug)]
pub struct StagedBlob {
    path: PathBuf,
    /// Bytes written.
    pub size: u64,
    /// The first bytes of the stream (up to `head_len`), for sniffing the format.
    pub head: Vec<u8>,
}

/// A staged file nobody committed is removed with its value, however its owner ended: an error
/// path, a handler future dropped because its client hung up or its body stalled (BODY_TIMEOUT).
impl Drop for StagedBlob {
    fn drop(&mut self) {
        // Empty once committed (renamed away). A blocking unlink is one short syscall, far cheaper
        // than a trip to the blocking pool, and a drop cannot await.
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl StagedBlob {
    /// The temporary file, for readers that need more than `head`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The data directory's file area.
#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
}

impl Blobs {
    /// Prepares `root/{inputs,results,tmp}` and removes temporaries a crash left behind.
    pub fn open(root: &Path) -> io::Result<Blobs> {
        for dir in ["inputs", "results", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Blobs { root: root.to_owned() })
    }

    /// The jobs that have a file of `kind` (files not named by a job id are left alone).
    pub fn list(&self, kind: BlobKind) -> io::Result<Vec<JobId>> {
        let dir = self.path(kind, JobId::new());
        let dir = dir.parent().unwrap_or(&self.root);
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(id) = entry?.file_name().to_str().and_then(JobId::parse) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Where a job's file of `kind` lives.
    pub fn path(&self, kind: BlobKind, id: JobId) -> PathBuf {
        let dir = match kind {
            BlobKind::Input => "inputs",
            BlobKind::Result => "results",
        };
        self.root.join(dir).join(id.to_string())
    }

    /// Writes `stream` to a temporary file, refusing more than `limit` bytes, and keeps its first
    /// `head_len` bytes in memory. Nothing is visible until [`Blobs::commit`].
    pub async fn stage<S, E>(&self, mut stream: S, limit: u64, head_len: usize) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        let path = self.root.join("tmp").join(uuid::Uuid::new_v4().simple().to_string());
        let file = tokio::fs::File::create(&path).await?;
        let mut staged = StagedBlob { path, size: 0, head: Vec::new() };
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let result: Result<(), BlobError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| BlobError::Source(error_chain(&e)))?;
                staged.size += chunk.len() as u64;
                if staged.size > limit {
                    return Err(BlobError::TooLarge { limit });
                }
                if staged.head.len() < head_len {
                    let take = (head_len - staged.head.len()).min(chunk.len());
                    staged.head.extend_from_slice(&chunk[..take]);
                }
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            out.get_ref().sync_all().await?;
            Ok(())
        }
        .await;
        // Closed first: Windows cannot remove an open file. On an error `staged` is dropped here,
        // which removes its file (so does a drop of this future mid-stream).
        drop(out);
        result.map(|()| staged)
    }

    /// Moves a staged file to its final place and makes the rename durable.
    pub async fn commit(&self, mut staged: StagedBlob, kind: BlobKind, id: JobId) -> io::Result<()> {
        let target = self.path(kind, id);
        tokio::fs::rename(&staged.path, &target).await?;
        // Renamed: nothing left for the drop to remove.
        staged.path = PathBuf::new();
        let dir = target.parent().map(Path::to_owned).unwrap_or_else(|| self.root.clone());
        tokio::task::spawn_blocking(move || sync_dir(&dir)).await.map_err(io::Error::other)?
    }

    /// Drops a staged file that will not be committed.
    pub async fn discard(&self, mut staged: StagedBlob) {
        let _ = tokio::fs::remove_file(&staged.path).await;
        staged.path = PathBuf::new();
    }

    /// Deletes a job's file of `kind`; a missing file is not an error (deletes are repeatable).
    pub async fn remove(&self, kind: BlobKind, id: JobId) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(kind, id)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// An error with its causes, `outer: inner: …`: the multipart parser's own message says only that
/// parsing failed, the cause says why (the client hung up, BODY_TIMEOUT).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Makes a rename in `dir` durable. On Unix that takes an fsync of the directory; Windows cannot
/// open a directory as a file, and NTFS journals the rename itself.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
