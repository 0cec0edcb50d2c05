//! The `tollgate` command: parses arguments, loads config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "One OpenAI-compatible API for every model provider"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file; without it, the embedded defaults (the repository's config.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print what it configures.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Acceptable-use policies: test, check a text, evaluate on a labelled file.
    Policy {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: tollgate::policy::cli::PolicyCommand,
    },
    /// Accounts.
    Accounts {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: tollgate::accounts::cli::AccountsCommand,
    },
    /// Credits and the ledger.
    Credits {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: tollgate::accounts::cli::CreditsCommand,
    },
    /// API keys.
    Keys {
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: tollgate::accounts::cli::KeysCommand,
    },
}

/// The billing handle the account, credit and key commands work on: reservations as rows, as
/// beside a running gateway.
fn billing(
    rt: &tokio::runtime::Runtime,
    config: Option<&std::path::Path>,
) -> anyhow::Result<tollgate::billing::Billing> {
    let cfg = tollgate::config::load(config)?;
    let db = rt.block_on(tollgate::store::Db::connect(&cfg.database.url))?;
    Ok(tollgate::billing::Billing::new(
        db,
        cfg.billing.reservation_ttl,
        None,
    ))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a component and print its manifest, without serving it.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let cfg = tollgate::config::load(config.as_deref())?;
            tollgate::telemetry::init(&cfg.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let running = tollgate::app::start(cfg).await?;
                running.run_until_signal().await;
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let cfg = tollgate::config::load(config.as_deref())?;
            eprintln!(
                "configuration is valid: {} channel(s), {} model(s); public API on {}, operator on {}",
                cfg.routes.channels.len(),
                cfg.routes.models.len(),
                cfg.server.listen,
                cfg.operator.listen
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { config, command } => {
            let cfg = tollgate::config::load(config.as_deref())?;
            tollgate::policy::cli::run(command, &cfg.moderation.policies_dir, &cfg.plugins)
        }
        Command::Accounts { config, command } => {
            let rt = runtime()?;
            let b = billing(&rt, config.as_deref())?;
            rt.block_on(tollgate::accounts::cli::accounts(&b, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Credits { config, command } => {
            let rt = runtime()?;
            let b = billing(&rt, config.as_deref())?;
            rt.block_on(tollgate::accounts::cli::credits(&b, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { config, command } => {
            let rt = runtime()?;
            let b = billing(&rt, config.as_deref())?;
            let policies = tollgate::config::load(config.as_deref())?
                .moderation
                .policies_dir;
            rt.block_on(tollgate::accounts::cli::keys_cmd(&b, &policies, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin { command } => match command {
            PluginCommand::Check { file } => {
                let cfg = tollgate::config::load(None)?;
                let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
                let mut pcfg = cfg.plugins.clone();
                pcfg.dir = PathBuf::from("/nonexistent-tollgate-plugin-dir");
                pcfg.bundled = false;
                let registry = tollgate::plugins::Registry::new(&pcfg, metrics)?;
                let plugin = registry.load_detached(&file)?;
                let m = &plugin.manifest;
                eprintln!(
                    "{} {}\n  kinds: {}\n  auth: {:?}\n  config keys: {}\n  models:",
                    m.name,
                    m.version,
                    m.kinds.join(", "),
                    m.auth,
                    m.config_keys.join(", ")
                );
                for model in &m.models {
                    eprintln!("    - {} ({})", model.id, model.kinds.join(", "));
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}
