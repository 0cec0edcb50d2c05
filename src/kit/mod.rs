//! The plugin kit, for plugin authors and operators: `tollgate plugin new` scaffolds a plugin
//! crate ([`new`]), `tollgate plugin check` loads a component (a provider or a policy plugin) and
//! runs its conformance checks through the host's own calls ([`check`]).

pub mod check;
pub mod new;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::PluginsConfig;
use crate::plugins::registry::Loaded;
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

/// What a checked component said it is.
#[derive(Debug, Clone)]
pub enum Described {
    Provider(Manifest),
    Policy {
        name: String,
        version: String,
        categories: Vec<String>,
    },
}

impl Described {
    pub fn name(&self) -> &str {
        match self {
            Self::Provider(m) => &m.name,
            Self::Policy { name, .. } => name,
        }
    }

    /// As `plugin check` prints it.
    pub fn render(&self) -> String {
        match self {
            Self::Provider(m) => render_manifest(m),
            Self::Policy {
                name,
                version,
                categories,
            } => format!(
                "{name} {version} (policy plugin)\n  categories: {}\n",
                categories.join(", ")
            ),
        }
    }
}

/// Load `file` outside any plugins folder (with the configured limits), a provider or a policy
/// plugin, and run every check of its kind.
pub fn check_file(
    cfg: &PluginsConfig,
    file: &Path,
    samples: Option<&Path>,
) -> Result<(Described, check::Report), CheckError> {
    let samples = samples.map(check::Samples::new).transpose()?;
    let mut pcfg = cfg.clone();
    pcfg.dir = PathBuf::from("/nonexistent-tollgate-plugin-dir");
    pcfg.bundled = false;
    let registry = Registry::new(&pcfg, Arc::new(crate::metrics::Metrics::new()))?;
    let loaded = registry.load_detached(file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CheckError::Runtime(e.to_string()))?;
    match loaded {
        Loaded::Provider(plugin) => {
            let report = rt.block_on(check::check(&plugin, samples.as_ref()))?;
            Ok((Described::Provider(plugin.manifest.clone()), report))
        }
        Loaded::Policy(plugin) => {
            let report = rt.block_on(check::check_policy(&plugin));
            let described = Described::Policy {
                name: plugin.name.clone(),
                version: plugin.version.clone(),
                categories: plugin.categories.clone(),
            };
            Ok((described, report))
        }
    }
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
