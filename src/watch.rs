//! Debounced file watching: the plugins folder and the config file reload through this.
//!
//! A notify watcher feeds a channel; one task on the gateway's blocking pool (tracked, so a
//! shutdown waits for a reload in progress) waits for a quiet period after the last event and
//! then runs the callback, so a file copied in several writes is looked at once it settles.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

/// How long the folder must stay quiet before the callback runs.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A running watch; dropping it stops the watcher and its thread.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

/// Watch `paths` (folders or files, non-recursively) and run `on_change` after changes settle.
pub fn spawn(
    bg: &crate::background::Background,
    paths: Vec<PathBuf>,
    on_change: impl Fn() + Send + 'static,
) -> Result<Watch, String> {
    spawn_filtered(bg, paths, None, on_change)
}

/// Watch one file: its folder is watched (editors replace files by rename, which a watch on the
/// file itself would lose), but only events that name the file count, so a busy neighbour (a
/// database in the same folder) neither triggers nor delays the callback.
pub fn spawn_file(
    bg: &crate::background::Background,
    file: PathBuf,
    on_change: impl Fn() + Send + 'static,
) -> Result<Watch, String> {
    let dir = file
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    let name = file
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .ok_or_else(|| format!("{} names no file", file.display()))?;
    spawn_filtered(bg, vec![dir], Some(name), on_change)
}

fn spawn_filtered(
    bg: &crate::background::Background,
    paths: Vec<PathBuf>,
    only: Option<std::ffi::OsString>,
    on_change: impl Fn() + Send + 'static,
) -> Result<Watch, String> {
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        let wanted = only.as_ref().is_none_or(|name| {
            ev.paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        });
        if wanted {
            let _ = tx.send(());
        }
    })
    .map_err(|e| e.to_string())?;
    for p in &paths {
        // A folder that does not exist yet is created so that it can be watched.
        if p.extension().is_none() && !p.exists() {
            let _ = std::fs::create_dir_all(p);
        }
        watcher
            .watch(p, RecursiveMode::NonRecursive)
            .map_err(|e| format!("watching {}: {e}", p.display()))?;
    }
    bg.spawn_blocking(move || {
        // Ends when the watcher (and so the sender) is dropped.
        while rx.recv().is_ok() {
            while rx.recv_timeout(DEBOUNCE).is_ok() {}
            on_change();
        }
    });
    Ok(Watch { _watcher: watcher })
}
