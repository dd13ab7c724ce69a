//! What the worker leaves in ComfyUI's folders, and how it keeps that bounded and per attempt.
//!
//! - [`attempt_dir`]: the spool folder of one attempt (job id *and* lease token), so two attempts
//!   of one job (several `COMFYUI_URLS`, workers sharing a spool) never touch each other's files.
//! - [`InputSlots`]: the upload names of one (worker, ComfyUI server): a small fixed pool
//!   `tdcomfy/<lease-name>-<n>.<ext>`, uploaded with `overwrite`. A name is taken by one attempt
//!   and is free again only when the prompt that read it has finished or has left ComfyUI's queue,
//!   so no prompt that may still read a frame ever sees it replaced. ComfyUI's `LoadImage` keys its
//!   cache on a SHA-256 of the file (`IS_CHANGED`), so new bytes under a reused name run again.
//!   When every name is still held (abandoned prompts still queued), a one-off name is used rather
//!   than waiting; one-off files are deleted once their prompt is gone, if the folder is reachable.
//! - [`ComfyFolders`]: ComfyUI's `input/` and `output/` on this machine, from `COMFYUI_DIR`,
//!   `COMFYUI_INPUT_DIR`, `COMFYUI_OUTPUT_DIR` or `/system_stats` `argv`. Used only after a file on
//!   disk was compared with the copy `/view` served ([`ServedCopy`]); every path is confined to
//!   the folder (no `..`, no symlinks). When they cannot be reached it says so once in the log.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use tdcomfy_api::{JobId, LeaseToken};
use tdcomfy_comfy::{ComfyClient, FolderType, OutputFile, PromptId};

/// The subfolder of ComfyUI's `input/` that uploads go to.
pub const INPUT_SUBFOLDER: &str = "tdcomfy";

/// Upload names per (worker, server). One attempt runs at a time per server; the others are for
/// prompts of ended attempts that may still sit in ComfyUI's queue (a stop that could not be
/// confirmed), before one-off names are needed.
pub const SLOTS_PER_SERVER: usize = 4;

/// The spool folder of one attempt: `<spool>/<job>-<lease token>`.
pub fn attempt_dir(spool: &Path, job_id: JobId, token: &LeaseToken) -> PathBuf {
    spool.join(format!("{job_id}-{}", file_safe(token.as_str(), 32)))
}

/// `s` reduced to ASCII letters, digits, `-` and `_` (others become `_`), at most `max` chars.
fn file_safe(s: &str, max: usize) -> String {
    let safe: String =
        s.chars().take(max).map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if safe.is_empty() { "_".to_owned() } else { safe }
}

/// The copy of a job's primary output that `/view` served, kept aside (out of the attempt's spool
/// folder, which goes when the attempt ends) until the file in ComfyUI's folder has been compared
/// with it; deleted when dropped.
#[derive(Debug)]
pub struct ServedCopy {
    path: PathBuf,
}

impl ServedCopy {
    /// Takes ownership of the file at `path` (it is deleted when this is dropped).
    pub fn new(path: PathBuf) -> ServedCopy {
        ServedCopy { path }
    }

    /// Moves `result` (a file in an attempt's spool folder) next to that folder, so the folder can
    /// be removed now and the comparison runs later, off the frame's path. A rename: no copy.
    pub async fn keep(result: &Path) -> Option<ServedCopy> {
        let attempt = result.parent()?;
        let name = format!("{}.served", attempt.file_name()?.to_string_lossy());
        let aside = attempt.parent()?.join(name);
        tokio::fs::rename(result, &aside).await.ok()?;
        Some(ServedCopy { path: aside })
    }
}

impl Drop for ServedCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether two files hold the same bytes (lengths first, then the contents, 256 KiB at a time).
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// What is known about the prompt that read an upload when its attempt ends.
#[derive(Debug, Clone)]
pub enum PromptFate {
    /// Never queued, or finished (history has it): nothing will read the file any more.
    Gone,
    /// Queued and maybe still there (stopped without confirmation, or ComfyUI unreachable).
    MaybeQueued(PromptId),
}

#[derive(Debug, Clone)]
enum SlotState {
    Free,
    Taken,
    Held(PromptId),
}

#[derive(Debug)]
struct OneOff {
    name: String,
    /// `None` while its attempt runs.
    fate: Option<PromptFate>,
}

#[derive(Debug)]
struct SlotTable {
    slots: Vec<SlotState>,
    /// Every name handed out per slot (one per image format), for the clean-up at shutdown.
    names: Vec<std::collections::BTreeSet<String>>,
    one_offs: Vec<OneOff>,
    one_offs_made: u64,
}

/// The upload names of one (worker, ComfyUI server).
#[derive(Debug)]
pub struct InputSlots {
    prefix: String,
    table: Mutex<SlotTable>,
}

/// An upload name taken for one attempt; give it back with [`InputSlots::release`].
#[derive(Debug)]
pub struct InputName {
    slot: Option<usize>,
    /// The file name (without the [`INPUT_SUBFOLDER`]).
    pub name: String,
}

impl InputSlots {
    /// A pool for the loop leasing as `lease_name` (the worker id, plus `/<index>` with several
    /// servers): the name is in every upload name, so two workers on one ComfyUI, or two servers
    /// sharing one input folder, never share a name.
    pub fn new(lease_name: &str) -> InputSlots {
        InputSlots {
            prefix: file_safe(lease_name, 100),
            table: Mutex::new(SlotTable {
                slots: vec![SlotState::Free; SLOTS_PER_SERVER],
                one_offs: Vec::new(),
                names: vec![std::collections::BTreeSet::new(); SLOTS_PER_SERVER],
                one_offs_made: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a free name for a frame with extension `ext`. When every slot is held by a prompt
    /// that may still be queued, asks ComfyUI's queue which of them are gone; if none is, uses a
    /// one-off name instead of waiting.
    pub async fn take(&self, client: &ComfyClient, ext: &str) -> InputName {
        let ext = file_safe(ext, 10);
        if let Some(name) = self.take_free(&ext) {
            return name;
        }
        let held: Vec<PromptId> = self
            .lock()
            .slots
            .iter()
            .filter_map(|s| match s {
                SlotState::Held(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        if !held.is_empty() {
            self.settle(client).await;
            if let Some(name) = self.take_free(&ext) {
                return name;
            }
        }
        let mut table = self.lock();
        table.one_offs_made += 1;
        let name = format!("{}-once-{}.{ext}", self.prefix, PromptId::new().as_str().replace('-', ""));
        tracing::warn!(
            name,
            one_offs = table.one_offs_made,
            "every upload name is still held by a prompt that may be queued in ComfyUI: using a one-off name"
        );
        table.one_offs.push(OneOff { name: name.clone(), fate: None });
        InputName { slot: None, name }
    }

    /// Frees the names whose prompt ComfyUI's queue no longer has.
    async fn settle(&self, client: &ComfyClient) {
        match client.queue().await {
            Ok(queue) => {
                let mut table = self.lock();
                for slot in &mut table.slots {
                    if let SlotState::Held(p) = slot
                        && queue.position(p).is_none()
                    {
                        *slot = SlotState::Free;
                    }
                }
                for one_off in &mut table.one_offs {
                    if let Some(PromptFate::MaybeQueued(p)) = &one_off.fate
                        && queue.position(p).is_none()
                    {
                        one_off.fate = Some(PromptFate::Gone);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read ComfyUI's queue to free upload names"),
        }
    }

    fn take_free(&self, ext: &str) -> Option<InputName> {
        let mut table = self.lock();
        let index = table.slots.iter().position(|s| matches!(s, SlotState::Free))?;
        table.slots[index] = SlotState::Taken;
        let name = format!("{}-{index}.{ext}", self.prefix);
        table.names[index].insert(name.clone());
        Some(InputName { slot: Some(index), name })
    }

    /// The names of free slots, taken out of use for good (the worker is stopping).
    fn retire_free(&self) -> Vec<String> {
        let mut table = self.lock();
        let mut names = Vec::new();
        for index in 0..table.slots.len() {
            if matches!(table.slots[index], SlotState::Free) {
                table.slots[index] = SlotState::Taken;
                names.extend(std::mem::take(&mut table.names[index]));
            }
        }
        names
    }

    /// Gives a name back once its attempt ended: free at once if its prompt is gone, otherwise
    /// held until ComfyUI's queue no longer has the prompt.
    pub fn release(&self, name: InputName, fate: PromptFate) {
        let mut table = self.lock();
        match name.slot {
            Some(index) => {
                table.slots[index] = match fate {
                    PromptFate::Gone => SlotState::Free,
                    PromptFate::MaybeQueued(p) => SlotState::Held(p),
                };
            }
            None => {
                if let Some(one_off) = table.one_offs.iter_mut().find(|o| o.name == name.name) {
                    one_off.fate = Some(fate);
                }
            }
        }
    }

    /// One-off names whose prompt is gone, removed from the table.
    fn drain_gone_one_offs(&self) -> Vec<String> {
        let mut table = self.lock();
        let (gone, kept): (Vec<OneOff>, Vec<OneOff>) =
            std::mem::take(&mut table.one_offs).into_iter().partition(|o| matches!(o.fate, Some(PromptFate::Gone)));
        table.one_offs = kept;
        gone.into_iter().map(|o| o.name).collect()
    }

    /// Puts one-off names back (their files could not be deleted yet).
    fn keep_one_offs(&self, names: Vec<String>) {
        let mut table = self.lock();
        table.one_offs.extend(names.into_iter().map(|name| OneOff { name, fate: Some(PromptFate::Gone) }));
    }
}

/// Where ComfyUI's folders are, as configured (`COMFYUI_DIR`, `COMFYUI_INPUT_DIR`,
/// `COMFYUI_OUTPUT_DIR`); unset parts are detected from `/system_stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderSettings {
    /// ComfyUI's base directory (its `input/` and `output/` are inside).
    pub base: Option<PathBuf>,
    /// ComfyUI's input folder.
    pub input: Option<PathBuf>,
    /// ComfyUI's output folder.
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Folders {
    input: Option<PathBuf>,
    output: Option<PathBuf>,
}

impl FolderSettings {
    /// The folders from these settings, with what ComfyUI's command line says filling the gaps:
    /// `--input-directory`, `--output-directory`, else `--base-directory`'s `input`/`output`, else
    /// the folder of `main.py`. Only absolute paths count (a relative one is relative to a
    /// working directory this worker does not know).
    fn resolve(&self, argv: &[String]) -> Folders {
        // `None`: flag absent; `Some(None)`: given, but relative (so the folder is unknown).
        let flag = |name: &str| -> Option<Option<PathBuf>> {
            let mut args = argv.iter().skip(1);
            let mut found = None;
            while let Some(arg) = args.next() {
                // argparse accepts `--flag value` and `--flag=value`; the last one wins.
                if arg == name {
                    found = args.next().map(PathBuf::from);
                } else if let Some(v) = arg.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')) {
                    found = Some(PathBuf::from(v));
                }
            }
            found.map(|p| Some(p).filter(|p| p.is_absolute()))
        };
        let main_dir = || {
            argv.first()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute() && p.file_name().is_some_and(|n| n == "main.py"))
                .and_then(|p| p.parent().map(Path::to_path_buf))
        };
        let base = match &self.base {
            Some(b) => Some(b.clone()),
            None => flag("--base-directory").unwrap_or_else(main_dir),
        };
        let pick = |explicit: &Option<PathBuf>, flag_name: &str, sub: &str| match (explicit, &self.base) {
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(b)) => Some(b.join(sub)),
            (None, None) => flag(flag_name).unwrap_or_else(|| base.as_ref().map(|b| b.join(sub))),
        };
        Folders {
            input: pick(&self.input, "--input-directory", "input"),
            output: pick(&self.output, "--output-directory", "output"),
        }
    }
}

#[derive(Debug)]
enum FolderState {
    /// Not looked at yet (or `/system_stats` did not answer last time).
    Unknown,
    /// Found, but no file has been checked against `/view` yet.
    Found(Folders),
    /// A file on disk matched what `/view` served: the folders are this server's.
    Verified(Folders),
    /// Not reachable, or a file did not match: never touched.
    Off,
}

/// ComfyUI's folders as seen from this worker, for one server.
#[derive(Debug)]
pub struct ComfyFolders {
    settings: FolderSettings,
    label: String,
    state: tokio::sync::Mutex<FolderState>,
}

impl ComfyFolders {
    /// Folders of the server `label` (for log lines).
    pub fn new(settings: FolderSettings, label: impl Into<String>) -> ComfyFolders {
        ComfyFolders { settings, label: label.into(), state: tokio::sync::Mutex::new(FolderState::Unknown) }
    }

    /// Looks the folders up if not done yet; logs once when they cannot be reached.
    async fn ensure(&self, client: &ComfyClient, state: &mut FolderState) {
        if !matches!(state, FolderState::Unknown) {
            return;
        }
        let argv = if self.settings.input.is_some() && self.settings.output.is_some() {
            Vec::new()
        } else {
            match client.system_stats().await {
                Ok(stats) => stats.argv,
                // Try again next time rather than deciding on a server that is away.
                Err(_) if self.settings == FolderSettings::default() => return,
                Err(_) => Vec::new(),
            }
        };
        let folders = self.settings.resolve(&argv);
        let reachable = folders.output.as_ref().is_some_and(|o| o.is_dir());
        if reachable {
            tracing::info!(comfyui = %self.label, output = ?folders.output, input = ?folders.input, "ComfyUI's folders found: finished jobs' files are removed from them");
            *state = FolderState::Found(folders);
        } else {
            tracing::warn!(
                comfyui = %self.label,
                output = ?folders.output,
                "ComfyUI's output folder is not reachable from this worker: job outputs stay on the ComfyUI machine (set COMFYUI_DIR, or COMFYUI_OUTPUT_DIR/COMFYUI_INPUT_DIR, if it is mounted here)"
            );
            *state = FolderState::Off;
        }
    }

    /// Deletes a delivered job's files from ComfyUI's output folder: every output of the prompt
    /// inside `job_subfolder` (`tdcomfy/<job>`) and any other file directly in that folder, then
    /// the folder if empty. `primary` is first compared with `served` (the copy `/view`
    /// streamed); on a mismatch nothing is deleted and the folders are not used again. Returns how
    /// many files were removed.
    pub async fn remove_outputs(
        &self,
        client: &ComfyClient,
        outputs: &[OutputFile],
        primary: &OutputFile,
        served: ServedCopy,
        job_subfolder: &str,
    ) -> usize {
        let mut state = self.state.lock().await;
        self.ensure(client, &mut state).await;
        let folders = match &*state {
            FolderState::Found(f) | FolderState::Verified(f) => f.clone(),
            FolderState::Unknown | FolderState::Off => return 0,
        };
        let Some(output_dir) = folders.output.clone() else {
            return 0;
        };
        let mine = |f: &OutputFile| {
            f.kind == FolderType::Output
                && (f.subfolder == job_subfolder || f.subfolder.starts_with(&format!("{job_subfolder}/")))
        };
        if !mine(primary) {
            return 0;
        }
        let (dir, primary_path) = (output_dir.clone(), (primary.subfolder.clone(), primary.filename.clone()));
        let matches = tokio::task::spawn_blocking(move || {
            let path = confined(&dir, &primary_path.0, &primary_path.1)?;
            same_bytes(&path, &served.path).ok()
        })
        .await
        .ok()
        .flatten();
        match matches {
            Some(true) => *state = FolderState::Verified(folders),
            Some(false) | None => {
                tracing::warn!(
                    comfyui = %self.label,
                    file = %primary.filename,
                    output = %output_dir.display(),
                    "the file in ComfyUI's output folder is not the one ComfyUI served: leaving its folders alone"
                );
                *state = FolderState::Off;
                return 0;
            }
        }
        drop(state);
        let files: Vec<(String, String)> =
            outputs.iter().filter(|f| mine(f)).map(|f| (f.subfolder.clone(), f.filename.clone())).collect();
        let job_subfolder = job_subfolder.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            let mut seen = std::collections::HashSet::new();
            for (sub, name) in files {
                if !seen.insert((sub.clone(), name.clone())) {
                    continue;
                }
                if let Some(path) = confined(&output_dir, &sub, &name)
                    && std::fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
            if let Some(dir) = confined_dir(&output_dir, &job_subfolder) {
                // Files a save node wrote without listing them (VideoHelperSuite's workflow PNG
                // beside its video) are the job's too: only this job's prompts write here.
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    // `DirEntry::file_type` does not follow symlinks: a link is left alone.
                    if entry.file_type().is_ok_and(|t| t.is_file()) && std::fs::remove_file(entry.path()).is_ok() {
                        removed += 1;
                    }
                }
                // A folder still holding something (a subfolder) stays: remove_dir refuses it.
                let _ = std::fs::remove_dir(dir);
            }
            removed
        })
        .await
        .unwrap_or(0)
    }

    /// Deletes one-off uploads whose prompt is gone, once the folders have been verified.
    pub async fn remove_one_offs(&self, client: &ComfyClient, slots: &InputSlots) {
        let waiting = slots.lock().one_offs.iter().any(|o| matches!(o.fate, Some(PromptFate::MaybeQueued(_))));
        if waiting {
            slots.settle(client).await;
        }
        let names = slots.drain_gone_one_offs();
        if names.is_empty() {
            return;
        }
        let input = match &*self.state.lock().await {
            FolderState::Verified(f) => f.input.clone(),
            _ => None,
        };
        let Some(input) = input else {
            slots.keep_one_offs(names);
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            for name in names {
                if let Some(path) = confined(&input, INPUT_SUBFOLDER, &name) {
                    let _ = std::fs::remove_file(path);
                }
            }
        })
        .await;
    }
}

impl ComfyFolders {
    /// At shutdown: deletes this pool's uploads that no prompt holds, once the folders have been
    /// verified, so a worker whose id changes with each start (the default `host-pid`) leaves
    /// nothing behind. Files still held by a queued prompt stay.
    pub async fn remove_free_slots(&self, slots: &InputSlots) {
        let input = match &*self.state.lock().await {
            FolderState::Verified(f) => f.input.clone(),
            _ => None,
        };
        let Some(input) = input else {
            return;
        };
        let names = slots.retire_free();
        let _ = tokio::task::spawn_blocking(move || {
            for name in names {
                if let Some(path) = confined(&input, INPUT_SUBFOLDER, &name) {
                    let _ = std::fs::remove_file(path);
                }
            }
        })
        .await;
    }
}

/// Everything the worker keeps about one ComfyUI server's files.
#[derive(Debug)]
pub struct ServerFiles {
    /// Upload names.
    pub slots: InputSlots,
    /// Its folders.
    pub folders: ComfyFolders,
}

impl ServerFiles {
    /// For the loop leasing as `lease_name` on server `label`.
    pub fn new(lease_name: &str, settings: FolderSettings, label: &str) -> Arc<ServerFiles> {
        Arc::new(ServerFiles { slots: InputSlots::new(lease_name), folders: ComfyFolders::new(settings, label) })
    }
}

/// Gives the upload name back when the attempt ends, whichever way it ends (also when its future
/// is dropped): [`PromptFate::Gone`] until a prompt is queued.
pub struct SlotGuard {
    files: Arc<ServerFiles>,
    name: Option<InputName>,
    fate: PromptFate,
}

impl SlotGuard {
    /// Takes a name for this attempt.
    pub async fn take(files: &Arc<ServerFiles>, client: &ComfyClient, ext: &str) -> SlotGuard {
        let name = files.slots.take(client, ext).await;
        SlotGuard { files: files.clone(), name: Some(name), fate: PromptFate::Gone }
    }

    /// The file name to upload under (inside [`INPUT_SUBFOLDER`]).
    pub fn name(&self) -> &str {
        self.name.as_ref().map_or("", |n| n.name.as_str())
    }

    /// What is now known about the prompt reading the file.
    pub fn set_fate(&mut self, fate: PromptFate) {
        self.fate = fate;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            self.files.slots.release(name, self.fate.clone());
        }
    }
}

/// `dir/sub/name` if `sub` and `name` are plain relative names and the file is a regular file
/// whose real folder is inside `dir` (no `..`, no absolute parts, no symlink out).
fn confined(dir: &Path, sub: &str, name: &str) -> Option<PathBuf> {
    let folder = confined_dir(dir, sub)?;
    let mut parts = Path::new(name).components();
    let (Some(Component::Normal(file)), None) = (parts.next(), parts.next()) else {
        return None;
    };
    let path = folder.join(file);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    meta.file_type().is_file().then_some(path)
}

fn confined_dir(dir: &Path, sub: &str) -> Option<PathBuf> {
    let sub = Path::new(sub);
    if !sub.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let root = dir.canonicalize().ok()?;
    let folder = root.join(sub).canonicalize().ok()?;
    folder.starts_with(&root).then_some(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn folders_come_from_settings_then_comfyui_s_command_line() {
        let none = FolderSettings::default();
        let f = none.resolve(&argv(&["/opt/ComfyUI/main.py", "--listen", "0.0.0.0"]));
        assert_eq!(f.output, Some(PathBuf::from("/opt/ComfyUI/output")));
        assert_eq!(f.input, Some(PathBuf::from("/opt/ComfyUI/input")));
        let f = none.resolve(&argv(&["main.py", "--base-directory", "/data/comfy", "--output-directory=/big/out"]));
        assert_eq!(f.output, Some(PathBuf::from("/big/out")));
        assert_eq!(f.input, Some(PathBuf::from("/data/comfy/input")));
        // A relative main.py or directory says nothing: ComfyUI's working directory is unknown.
        let f = none.resolve(&argv(&["main.py", "--input-directory", "in"]));
        assert_eq!((f.input, f.output), (None, None));
        let f = none.resolve(&argv(&["/opt/ComfyUI/main.py", "--output-directory", "out"]));
        assert_eq!(f.output, None, "a relative --output-directory is not <main.py's folder>/output");
        assert_eq!(f.input, Some(PathBuf::from("/opt/ComfyUI/input")));
        let f = none.resolve(&argv(&["/opt/ComfyUI/main.py", "--base-directory", "rel"]));
        assert_eq!((f.input, f.output), (None, None));
        let set = FolderSettings { base: Some("/srv/comfy".into()), output: Some("/mnt/out".into()), input: None };
        let f = set.resolve(&argv(&["main.py", "--input-directory", "/elsewhere/in"]));
        assert_eq!(f.output, Some(PathBuf::from("/mnt/out")));
        assert_eq!(f.input, Some(PathBuf::from("/srv/comfy/input")), "COMFYUI_DIR beats ComfyUI's flags");
    }

    #[test]
    fn same_bytes_compares_length_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let write = |name: &str, bytes: &[u8]| {
            let path = tmp.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let a = write("a", &data);
        assert!(same_bytes(&a, &write("b", &data)).unwrap());
        let mut changed = data.clone();
        changed[500_000] ^= 1;
        assert!(!same_bytes(&a, &write("c", &changed)).unwrap(), "a byte past the first chunk differs");
        assert!(!same_bytes(&a, &write("d", &data[..599_999])).unwrap(), "shorter");
    }

    #[test]
    fn paths_never_leave_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("output");
        std::fs::create_dir_all(out.join("tdcomfy/job")).unwrap();
        std::fs::write(out.join("tdcomfy/job/a.png"), b"x").unwrap();
        std::fs::write(tmp.path().join("secret"), b"x").unwrap();
        assert!(confined(&out, "tdcomfy/job", "a.png").is_some());
        assert!(confined(&out, "tdcomfy/job/..", "a.png").is_none());
        assert!(confined(&out, "tdcomfy/job", "../job/a.png").is_none());
        assert!(confined(&out, "..", "secret").is_none());
        assert!(confined(&out, "/etc", "passwd").is_none());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path(), out.join("tdcomfy/escape")).unwrap();
            std::os::unix::fs::symlink(tmp.path().join("secret"), out.join("tdcomfy/job/link")).unwrap();
            assert!(confined(&out, "tdcomfy/escape", "secret").is_none(), "a symlinked folder leaves");
            assert!(confined(&out, "tdcomfy/job", "link").is_none(), "a symlinked file is not a file");
        }
    }
}
