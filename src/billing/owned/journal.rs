//! The charge journal: the charges made durable (one JSON line each, one `write` per charge)
//! and not yet in the ledger, the ids of recent charges, and the file's rotation.

use std::collections::{HashSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::*;

/// The charges made durable and not yet in the ledger, and where they are written.
pub(super) struct Journal {
    /// `None` for an in-memory database: nothing outlives the process anyway.
    pub(super) file: Option<(PathBuf, std::fs::File)>,
    /// Bytes in the file.
    pub(super) written: u64,
    /// Journaled, in order, not yet in the ledger.
    pub(super) waiting: VecDeque<Charge>,
    /// Request ids of recent charges, and their order for forgetting the oldest.
    pub(super) recent: HashSet<String>,
    pub(super) order: VecDeque<String>,
}

impl Journal {
    /// One `write` of a whole line.
    pub(super) fn append(&mut self, text: &[u8]) -> std::io::Result<()> {
        if let Some((_, file)) = &mut self.file {
            file.write_all(text)?;
        }
        self.written += text.len() as u64;
        Ok(())
    }

    pub(super) fn remember(&mut self, request_id: &str) {
        if self.order.len() >= RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        self.recent.insert(request_id.to_string());
        self.order.push_back(request_id.to_string());
    }

    /// Once the file is long, write the waiting lines to a new file and put it in place (a
    /// rename: a crash leaves either the old file or the new one, never neither).
    pub(super) fn rotate(&mut self) -> std::io::Result<()> {
        let Some((path, _)) = &self.file else {
            return Ok(());
        };
        if self.written < ROTATE_BYTES {
            return Ok(());
        }
        let path = path.clone();
        let fresh = sibling(&path, ".rotating");
        let mut text = Vec::new();
        for c in &self.waiting {
            line(&mut text, c)?;
        }
        std::fs::write(&fresh, &text)?;
        std::fs::rename(&fresh, &path)?;
        let file = append_to(&path)?;
        self.written = text.len() as u64;
        self.file = Some((path, file));
        Ok(())
    }
}

pub(super) fn line(out: &mut Vec<u8>, c: &Charge) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, c)?;
    out.push(b'\n');
    Ok(())
}

pub(super) fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// `path` with `suffix` added to its file name.
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the journal of a database file lives.
pub fn journal_path(database_file: &Path) -> PathBuf {
    sibling(database_file, "-charges")
}
