//! Job inputs and results: the one storage interface of the broker, with two places behind it.
//!
//! - **Files** (the default under `DATA_DIR/files`, or `STORAGE_URL=file:///shared/path`): bytes go
//!   to disk chunk by chunk (never whole in memory), first under a temporary name in `tmp/`, then
//!   synced and renamed into place, with the directory synced after the rename. A reader therefore
//!   sees either no file or a complete one, and a crash leaves at most a stray temporary file, which
//!   [`Blobs::open`] sweeps away.
//! - **Objects** (`STORAGE_URL=s3://bucket/prefix`, any S3-compatible store, through
//!   `object_store`): a result streams as it arrives into an upload of its own temporary key
//!   (`tmp/<uuid>`, one part of [`PART_SIZE`] in memory at most; a multipart upload once it is
//!   larger, which S3 shows to nobody until it completes), and its commit is a server-side copy to
//!   its job's key. A frame is staged on the broker's disk first (its checks walk the whole file),
//!   then streamed from there to its key before the job is acknowledged. Dedupe's own copy is a
//!   server-side copy; downloads are ranged GETs streamed through, or presigned URLs.
//!
//! Either way the object or file is complete in storage before the record that names it is
//! written (submit, result), which is the invariant the service relies on.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tdcomfy_api::JobId;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Bytes an object upload holds in memory at most: one part. An object no larger goes as one
/// PUT; a larger one becomes a multipart upload of parts this size (S3 wants at least 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// Temporaries on shared storage younger than this are left alone at start: another broker
/// sharing the storage may be writing them.
const SHARED_TMP_GRACE: Duration = Duration::from_secs(3600);

/// Files and objects no job owns are kept this long on shared storage before `reconcile_files`
/// may delete them: another broker on the same database may have written the file and not yet
/// committed the row that names it (files before the record).
pub const SHARED_ORPHAN_GRACE: Duration = Duration::from_secs(900);

/// Which file of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// The frame the client sent.
    Input,
    /// The video (or image) the worker produced.
    Result,
}

impl BlobKind {
    fn dir(self) -> &'static str {
        match self {
            BlobKind::Input => "inputs",
            BlobKind::Result => "results",
        }
    }
}

/// Where jobs' files live (`STORAGE_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLocation {
    /// `DATA_DIR/files` (unset `STORAGE_URL`): this broker's own files.
    DataDir,
    /// `file:///path`: a directory other brokers may share.
    Dir(PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without slashes at either end (may be empty).
        prefix: String,
        /// Endpoint and credentials.
        settings: S3Settings,
    },
}

/// How to reach the S3 store; unset values come from the environment as AWS tools read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// `AWS_ENDPOINT_URL` (or `S3_ENDPOINT`): MinIO, Garage, R2, a LAN store… Unset: AWS.
    pub endpoint: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_REGION` (default `us-east-1`, what most S3-compatible stores accept).
    pub region: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<set>"))
            .field("region", &self.region)
            .finish()
    }
}

impl StorageLocation {
    /// Parses `STORAGE_URL`; the error says what is wrong with it.
    pub fn parse(url: Option<&str>, settings: S3Settings) -> Result<StorageLocation, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(StorageLocation::DataDir);
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("{url:?}: a file URL needs an absolute path, e.g. file:///srv/tdcomfy"));
            }
            return Ok(StorageLocation::Dir(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{url:?}: no bucket; expected s3://bucket/prefix"));
            }
            let prefix = prefix.trim_matches('/').to_owned();
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(format!("{url:?}: the prefix must be plain path segments"));
            }
            return Ok(StorageLocation::S3 { bucket: bucket.to_owned(), prefix, settings });
        }
        Err(format!("{url:?}: expected file:///path or s3://bucket/prefix"))
    }

    /// True when another broker may use the same files (anything but the default).
    pub fn is_shared(&self) -> bool {
        !matches!(self, StorageLocation::DataDir)
    }
}

/// How writing a stream to storage failed.
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
    /// The disk or the object store failed.
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
}

/// A stream written to a temporary file or object, not yet visible under its final name.
#[derive(Debug)]
pub struct StagedBlob {
    path: PathBuf,
    /// The temporary object a result streamed into (object storage only).
    object: Option<TempObject>,
    /// Bytes written.
    pub size: u64,
    /// The first bytes of the stream (up to `head_len`), for sniffing the format.
    pub head: Vec<u8>,
    /// SHA-256 of all the bytes, when staged with [`Blobs::stage_hashed`].
    pub sha256: Option<[u8; 32]>,
}

/// A staged object nobody committed yet.
#[derive(Debug)]
struct TempObject {
    store: Arc<AmazonS3>,
    key: Key,
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
        // A drop cannot await a DELETE: it goes on a task of its own. Lost only if the runtime
        // itself is going away, and then the next start's sweep of `tmp/` removes it.
        if let Some(t) = self.object.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = t.store.delete(&t.key).await;
            });
        }
    }
}

impl StagedBlob {
    /// Counts a chunk against `limit` and keeps what `head` still lacks of its first bytes.
    fn count(&mut self, chunk: &[u8], limit: u64, head_len: usize) -> Result<(), BlobError> {
        self.size += chunk.len() as u64;
        if self.size > limit {
            return Err(BlobError::TooLarge { limit });
        }
        if self.head.len() < head_len {
            let take = (head_len - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        Ok(())
    }

    /// The temporary file, for readers that need more than `head` (frames only: a result staged
    /// on object storage has no local file).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The object-store side of [`Blobs`].
#[derive(Debug, Clone)]
struct Objects {
    store: Arc<AmazonS3>,
    prefix: String,
}

impl Objects {
    fn key(&self, kind: BlobKind, id: JobId) -> Key {
        self.under(&format!("{}/{id}", kind.dir()))
    }

    fn under(&self, rest: &str) -> Key {
        if self.prefix.is_empty() { Key::from(rest) } else { Key::from(format!("{}/{rest}", self.prefix)) }
    }
}

/// The file area: local files (this broker's or a shared directory), or objects.
#[derive(Debug, Clone)]
pub struct Blobs {
    /// Files: everything. Objects: only the staging of frames, in `tmp/`.
    root: PathBuf,
    objects: Option<Objects>,
    shared: bool,
}

impl Blobs {
    /// Prepares `root/{inputs,results,tmp}` and removes temporaries a crash left behind.
    pub fn open(root: &Path) -> io::Result<Blobs> {
        Self::open_local(root, false)
    }

    fn open_local(root: &Path, shared: bool) -> io::Result<Blobs> {
        for dir in ["inputs", "results", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            // On a shared directory another broker's upload in flight looks just like a
            // crash's leftover, so only old ones go.
            if shared && !older_than(entry.metadata().and_then(|m| m.modified()).ok(), SHARED_TMP_GRACE) {
                continue;
            }
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(Blobs { root: root.to_owned(), objects: None, shared })
    }

    /// Opens the storage `STORAGE_URL` names; `data_files` (`DATA_DIR/files`) holds the default
    /// storage, and frames being checked when the files live elsewhere. S3 settings come from the
    /// environment (README, "Shared storage"); nothing is sent to the store until first used.
    pub async fn open_at(location: &StorageLocation, data_files: &Path) -> io::Result<Blobs> {
        match location {
            StorageLocation::DataDir => Self::open_local(data_files, false),
            StorageLocation::Dir(dir) => Self::open_local(dir, true),
            StorageLocation::S3 { bucket, prefix, settings } => {
                let mut staging = Self::open_local(data_files, false)?;
                let store = Arc::new(s3_store(bucket, settings)?);
                let objects = Objects { store, prefix: prefix.clone() };
                // Reachable and allowed, or the broker does not start: a wrong endpoint or key
                // must not first show as failed submits.
                let tmp = objects.under("tmp");
                let listed: Vec<_> = objects.store.list(Some(&tmp)).try_collect().await.map_err(io::Error::from)?;
                for meta in listed {
                    let modified = SystemTime::UNIX_EPOCH
                        .checked_add(Duration::from_millis(meta.last_modified.timestamp_millis().max(0) as u64));
                    if older_than(modified, SHARED_TMP_GRACE) {
                        let _ = objects.store.delete(&meta.location).await;
                    }
                }
                staging.objects = Some(objects);
                staging.shared = true;
                Ok(staging)
            }
        }
    }

    /// True when other brokers may share this storage (`STORAGE_URL` set).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// True when results can be handed out as presigned URLs (object storage).
    pub fn can_presign(&self) -> bool {
        self.objects.is_some()
    }

    /// The jobs that have a file of `kind`, each with when it was written (files not named by a
    /// job id are left alone).
    pub async fn list(&self, kind: BlobKind) -> io::Result<Vec<(JobId, Option<SystemTime>)>> {
        if let Some(o) = &self.objects {
            let listed: Vec<_> =
                o.store.list(Some(&o.under(kind.dir()))).try_collect().await.map_err(io::Error::from)?;
            return Ok(listed
                .into_iter()
                .filter_map(|m| {
                    let id = m.location.filename().and_then(JobId::parse)?;
                    let ms = m.last_modified.timestamp_millis().max(0) as u64;
                    Some((id, SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))))
                })
                .collect());
        }
        let dir = self.root.join(kind.dir());
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                if let Some(id) = entry.file_name().to_str().and_then(JobId::parse) {
                    ids.push((id, entry.metadata().and_then(|m| m.modified()).ok()));
                }
            }
            Ok(ids)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Where a job's file of `kind` lives (files storage; on object storage, a path that does not
    /// exist).
    pub fn path(&self, kind: BlobKind, id: JobId) -> PathBuf {
        self.root.join(kind.dir()).join(id.to_string())
    }

    /// Writes `stream` to a temporary file (or, on object storage, a temporary object), refusing
    /// more than `limit` bytes, and keeps its first `head_len` bytes in memory. Nothing is visible
    /// until [`Blobs::commit`].
    pub async fn stage<S, E>(&self, stream: S, limit: u64, head_len: usize) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        match &self.objects {
            Some(o) => self.stage_object(o, stream, limit, head_len).await,
            None => self.stage_with(stream, limit, head_len, None).await,
        }
    }

    /// [`Blobs::stage`] to a local temporary file in every storage (a frame: its checks read the
    /// whole file), hashing the bytes (SHA-256) chunk by chunk as they go to disk, so a frame can be
    /// recognised (`dedupe`) without reading it again.
    pub async fn stage_hashed<S, E>(&self, stream: S, limit: u64, head_len: usize) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        self.stage_with(stream, limit, head_len, Some(Sha256::new())).await
    }

    async fn stage_object<S, E>(
        &self,
        o: &Objects,
        mut stream: S,
        limit: u64,
        head_len: usize,
    ) -> Result<StagedBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error,
    {
        let key = o.under(&format!("tmp/{}", uuid::Uuid::new_v4().simple()));
        let mut staged = StagedBlob { path: PathBuf::new(), object: None, size: 0, head: Vec::new(), sha256: None };
        // Aborted when dropped unfinished (a client that hangs up drops this future): S3 shows an
        // unfinished upload to no reader, and the abort frees its parts.
        let mut writer = ObjectWriter::new(o.store.clone(), key.clone());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Source(error_chain(&e)))?;
            staged.count(&chunk, limit, head_len)?;
            writer.write(chunk).await?;
        }
        writer.finish().await?;
        staged.object = Some(TempObject { store: o.store.clone(), key });
        Ok(staged)
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
        // Created inline, with its guard in the same step: a create awaited on the blocking pool
        // finishes even when this future is dropped meanwhile (a client that hangs up), leaving
        // a file no guard removes. One open(2), like the unlink in the drop.
        let file = std::fs::File::create(&path)?;
        let mut staged = StagedBlob { path, object: None, size: 0, head: Vec::new(), sha256: None };
        let file = tokio::fs::File::from_std(file);
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let result: Result<(), BlobError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| BlobError::Source(error_chain(&e)))?;
                staged.count(&chunk, limit, head_len)?;
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
                out.write_all(&chunk).await?;
            }
            out.flush().await?;
            // Only the final copy needs to be durable when it goes on to object storage.
            if self.objects.is_none() {
                out.get_ref().sync_all().await?;
            }
            Ok(())
        }
        .await;
        // Closed first: Windows cannot remove an open file. On an error `staged` is dropped here,
        // which removes its file (so does a drop of this future mid-stream).
        drop(out);
        staged.sha256 = hasher.map(|h| h.finalize().into());
        result.map(|()| staged)
    }

    /// Moves a staged file to its final place and makes it durable: a rename (files), a
    /// server-side copy of the temporary object or an upload of the local file (objects).
    pub async fn commit(&self, mut staged: StagedBlob, kind: BlobKind, id: JobId) -> io::Result<()> {
        if let Some(o) = &self.objects {
            let target = o.key(kind, id);
            if let Some(t) = staged.object.take() {
                // S3 has no rename: a server-side copy, then the temporary goes (the bytes never
                // come back through the broker).
                let copied = o.store.copy(&t.key, &target).await.map_err(io::Error::from);
                let _ = t.store.delete(&t.key).await;
                return copied;
            }
            let mut file = tokio::fs::File::open(&staged.path).await?;
            let mut writer = ObjectWriter::new(o.store.clone(), target);
            let mut buf = BytesMut::with_capacity(256 * 1024);
            loop {
                buf.reserve(256 * 1024);
                if file.read_buf(&mut buf).await? == 0 {
                    break;
                }
                writer.write(buf.split().freeze()).await?;
            }
            return writer.finish().await;
        }
        let target = self.path(kind, id);
        tokio::fs::rename(&staged.path, &target).await?;
        // Renamed: nothing left for the drop to remove.
        staged.path = PathBuf::new();
        let dir = target.parent().map(Path::to_owned).unwrap_or_else(|| self.root.clone());
        tokio::task::spawn_blocking(move || sync_dir(&dir)).await.map_err(io::Error::other)?
    }

    /// Gives job `to` its own file of `kind` with the bytes of `from`'s: a hard link (the same
    /// bytes, no copy; either name can be deleted without touching the other), or a copy where
    /// linking fails (a file system without links); on object storage a server-side copy. The
    /// new name appears complete and durable. `NotFound` when `from` has no such file.
    pub async fn link(&self, kind: BlobKind, from: JobId, to: JobId) -> io::Result<()> {
        if let Some(o) = &self.objects {
            return o.store.copy(&o.key(kind, from), &o.key(kind, to)).await.map_err(io::Error::from);
        }
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
        if !staged.path.as_os_str().is_empty() {
            let _ = tokio::fs::remove_file(&staged.path).await;
            staged.path = PathBuf::new();
        }
        if let Some(t) = staged.object.take() {
            let _ = t.store.delete(&t.key).await;
        }
    }

    /// Deletes a job's file of `kind`; a missing file is not an error (deletes are repeatable).
    pub async fn remove(&self, kind: BlobKind, id: JobId) -> io::Result<()> {
        if let Some(o) = &self.objects {
            return match o.store.delete(&o.key(kind, id)).await {
                Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        match tokio::fs::remove_file(self.path(kind, id)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The bytes `start..start+len` of a job's file, as a stream of chunks (a ranged GET on
    /// object storage). `NotFound` when the file is gone.
    pub async fn read(
        &self,
        kind: BlobKind,
        id: JobId,
        start: u64,
        len: u64,
    ) -> io::Result<BoxStream<'static, io::Result<Bytes>>> {
        if let Some(o) = &self.objects {
            // An empty range is no valid Range header; nothing to fetch either.
            if len == 0 {
                return Ok(futures_util::stream::empty().boxed());
            }
            let options = GetOptions { range: Some(GetRange::Bounded(start..start + len)), ..Default::default() };
            let got = o.store.get_opts(&o.key(kind, id), options).await.map_err(io::Error::from)?;
            return Ok(got.into_stream().map_err(io::Error::from).boxed());
        }
        let mut file = tokio::fs::File::open(self.path(kind, id)).await?;
        if start > 0 {
            file.seek(io::SeekFrom::Start(start)).await?;
        }
        Ok(tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024).boxed())
    }

    /// A URL that lets its holder GET a job's file from the object store for `expires_in`
    /// without credentials; `None` on files storage.
    pub async fn presign(&self, kind: BlobKind, id: JobId, expires_in: Duration) -> io::Result<Option<String>> {
        let Some(o) = &self.objects else { return Ok(None) };
        let url =
            o.store.signed_url(axum::http::Method::GET, &o.key(kind, id), expires_in).await.map_err(io::Error::from)?;
        Ok(Some(url.to_string()))
    }
}

/// The S3 client: bucket from `STORAGE_URL`, endpoint and keys from the settings, anything else
/// (`AWS_SESSION_TOKEN`, …) from the environment. Path-style requests (what MinIO, Garage and Ceph
/// expect) unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`; plain HTTP allowed when the endpoint
/// says `http://` (a store on the LAN or loopback).
fn s3_store(bucket: &str, settings: &S3Settings) -> io::Result<AmazonS3> {
    // A download to a slow client may take far longer than any request timeout; connecting is
    // what must be quick. The uploads are bounded by BODY_TIMEOUT on the client's side.
    let mut options =
        object_store::ClientOptions::new().with_timeout_disabled().with_connect_timeout(Duration::from_secs(5));
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = settings.endpoint.clone().or_else(|| std::env::var("S3_ENDPOINT").ok());
    if let Some(endpoint) = endpoint.map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()) {
        if endpoint.starts_with("http://") {
            options = options.with_allow_http(true);
        }
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(key) = &settings.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &settings.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let region = settings.region.clone().or_else(|| std::env::var("AWS_DEFAULT_REGION").ok());
    builder = builder.with_region(region.unwrap_or_else(|| "us-east-1".to_owned()));
    builder.with_client_options(options).build().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn older_than(modified: Option<SystemTime>, age: Duration) -> bool {
    modified.and_then(|m| SystemTime::now().duration_since(m).ok()).is_none_or(|a| a >= age)
}

/// Uploads a stream of chunks to one key: one PUT when it fits in a part, else a multipart
/// upload with [`PARTS_IN_FLIGHT`] parts in flight. Dropped unfinished, it aborts the upload.
struct ObjectWriter {
    store: Arc<AmazonS3>,
    key: Key,
    buffered: Vec<Bytes>,
    buffered_len: usize,
    multipart: Option<WriteMultipart>,
}

impl ObjectWriter {
    fn new(store: Arc<AmazonS3>, key: Key) -> ObjectWriter {
        ObjectWriter { store, key, buffered: Vec::new(), buffered_len: 0, multipart: None }
    }

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if let Some(m) = self.multipart.as_mut() {
            // Waits for a part slot: a fast sender is held back instead of filling memory.
            m.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(io::Error::from)?;
            m.put(chunk);
            return Ok(());
        }
        self.buffered_len += chunk.len();
        self.buffered.push(chunk);
        if self.buffered_len > PART_SIZE {
            let upload = self.store.put_multipart(&self.key).await.map_err(io::Error::from)?;
            let mut m = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for b in self.buffered.drain(..) {
                m.put(b);
            }
            self.buffered_len = 0;
            self.multipart = Some(m);
        }
        Ok(())
    }

    async fn finish(mut self) -> io::Result<()> {
        if let Some(m) = self.multipart.take() {
            return m.finish().await.map(|_| ()).map_err(io::Error::from);
        }
        let payload: PutPayload = std::mem::take(&mut self.buffered).into_iter().collect();
        self.store.put(&self.key, payload).await.map(|_| ()).map_err(io::Error::from)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(m) = self.multipart.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = m.abort().await;
            });
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
