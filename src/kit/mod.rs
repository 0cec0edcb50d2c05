//! The plugin kit, for plugin authors and operators: `tollgate plugin new` scaffolds a plugin
//! crate ([`new`]), `tollgate plugin check` loads a component and runs its conformance checks
//! through the host's own session code ([`check`]).

pub mod check;
pub mod new;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::PluginsConfig;
use crate::plugins::{LoadError, Manifest, Registry};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Samples(#[from] check::SamplesError),
    #[error("starting the async runtime: {0}")]
    Runtime(String),
}

/// Load `file` outside any plugins folder (with the configured limits) and run every check.
pub fn check_file(
    cfg: &PluginsConfig,
    file: &Path,
    samples: Option<&Path>,
) -> Result<(Manifest, check::Report), CheckError> {
    let samples = samples.map(check::Samples::new).transpose()?;
    let mut pcfg = cfg.clone();
    pcfg.dir = PathBuf::from("/nonexistent-tollgate-plugin-dir");
    pcfg.bundled = false;
    let registry = Registry::new(&pcfg, Arc::new(crate::metrics::Metrics::new()))?;
    let plugin = registry.load_detached(file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CheckError::Runtime(e.to_string()))?;
    let report = rt.block_on(check::check(&plugin, samples.as_ref()))?;
    Ok((plugin.manifest.clone(), report))
}

/// The manifest as `plugin check` prints it.
pub fn render_manifest(m: &Manifest) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}\n  kinds: {}\n  auth: {:?}\n  config keys: {}\n  models:",
        m.name,
        m.version,
        m.kinds.join(", "),
        m.auth,
        m.config_keys.join(", ")
    );
    for model in &m.models {
        let _ = writeln!(out, "    - {} ({})", model.id, model.kinds.join(", "));
    }
    out
}
