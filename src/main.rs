//! The `tollgate` command: parses arguments, loads config, and hands over to the library.

use std::io::Write as _;
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
    /// Load a component, print its manifest and run its conformance checks (nothing is sent
    /// anywhere); exits non-zero if a check fails.
    Check {
        file: PathBuf,
        /// A folder of the upstream's recorded answers (`chat.json`, `chat.sse`, `<kind>.json`):
        /// they must translate.
        #[arg(long)]
        samples: Option<PathBuf>,
    },
    /// Write a new plugin crate: a provider for an OpenAI-like upstream with its tests.
    New {
        /// The plugin's name: lowercase letters, digits and `_` (also the crate and `NAME.wasm`).
        name: String,
        /// The folder to create the crate `NAME` in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The plugin SDK (`plugins/sdk` of a tollgate checkout); found above DIR or the working
        /// directory if not given.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// A request makes a few hundred small allocations across threads (the async workers, the
/// ledger writer): mimalloc serves them from per-thread pages, for less CPU than the system's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            PluginCommand::Check { file, samples } => {
                let cfg = tollgate::config::load(None)?;
                let (described, report) =
                    tollgate::kit::check_file(&cfg.plugins, &file, samples.as_deref())?;
                let mut out = std::io::stdout().lock();
                write!(out, "{}", described.render())?;
                write!(out, "\n{}", report.render())?;
                Ok(if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            PluginCommand::New { name, dir, sdk } => {
                let made = tollgate::kit::new::create(&name, &dir, sdk.as_deref())?;
                eprintln!(
                    "created the plugin crate `{name}` in {} (SDK: {})\n\n  cd {}\n  cargo test\n  cargo build --release --target wasm32-wasip2\n  tollgate plugin check target/wasm32-wasip2/release/{name}.wasm --samples samples",
                    made.dir.display(),
                    made.sdk,
                    made.dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}
