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
use sha2::{Digest, Sha256};
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
    /// SHA-256 of all the bytes, when staged with [`Blobs::stage_hashed`].
    pub sha256: Option<[u8; 32]>,
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
    pub async fn stage<S, E>(&self, stream: S, limit: u64, head_len: usize) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        self.stage_with(stream, limit, head_len, None).await
    }

    /// [`Blobs::stage`], hashing the bytes (SHA-256) chunk by chunk as they go to disk, so a frame
    /// can be recognised (`dedupe`) without reading it again.
    pub async fn stage_hashed<S, E>(&self, stream: S, limit: u64, head_len: usize) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        self.stage_with(stream, limit, head_len, Some(Sha256::new())).await
    }

    async fn stage_with<S, E>(
        &self,
        mut stream: S,
        limit: u64,
        head_len: usize,
        mut hasher: Option<Sha256>,
    ) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        let path = self.root.join("tmp").join(uuid::Uuid::new_v4().simple().to_string());
        let file = tokio::fs::File::create(&path).await?;
        let mut staged = StagedBlob { path, size: 0, head: Vec::new(), sha256: None };
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
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
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
        staged.sha256 = hasher.map(|h| h.finalize().into());
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

    /// Gives job `to` its own file of `kind` with the bytes of `from`'s: a hard link (the same
    /// bytes, no copy; either name can be deleted without touching the other), or a copy where
    /// linking fails (a file system without links). The new name appears complete and durable.
    pub async fn link(&self, kind: BlobKind, from: JobId, to: JobId) -> io::Result<()> {
        let (source, target) = (self.path(kind, from), self.path(kind, to));
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().simple().to_string());
        tokio::task::spawn_blocking(move || {
            let linked = std::fs::hard_link(&source, &target);
            if let Err(e) = linked {
                if e.kind() == io::ErrorKind::NotFound {
                    return Err(e);
                }
                // Copied under a temporary name, synced, then renamed: a reader never sees half.
                let copied = (|| {
                    std::fs::copy(&source, &tmp)?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    std::fs::rename(&tmp, &target)
                })();
                if copied.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                copied?;
            }
            sync_dir(target.parent().unwrap_or(Path::new(".")))
        })
        .await
        .map_err(io::Error::other)?
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
