//! The data directory's lock: one broker at a time on one `DATA_DIR`.
//!
//! Two brokers on one folder would each lease the same queued jobs, expire each other's leases and
//! delete each other's files, so the second one refuses to start. The lock is the operating
//! system's exclusive file lock on `DATA_DIR/broker.lock`, held for the life of [`crate::run`]; it
//! goes with the process however it ends (a SIGKILLed broker leaves no stale lock to clean up).
//! The file's text names the holder, for the second broker's message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use crate::service::BrokerError;

/// Holds `DATA_DIR` for this broker until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock, or fails with [`BrokerError::DataDirInUse`] naming the broker holding it.
    pub fn acquire(dir: &Path, addr: SocketAddr) -> Result<DataDirLock, BrokerError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("broker.lock");
        // Not truncated on open: the holder's text must survive a loser's open.
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // Unreadable while locked on Windows; the message then says so.
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "unknown process".to_owned());
                return Err(BrokerError::DataDirInUse { dir: dir.to_owned(), holder });
            }
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
        file.set_len(0)?;
        file.write_all(format!("pid {} listening on {addr}\n", std::process::id()).as_bytes())?;
        Ok(DataDirLock { _file: file })
    }
}
