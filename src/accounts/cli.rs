//! `tollgate accounts|credits|keys ...`: the operator's commands, straight against the database
//! named by the configuration (the gateway need not run).

use clap::Subcommand;

use super::keys::{self, NewKey};
use crate::billing::Billing;
use crate::limits::Limits;

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    Create { name: String },
    /// List accounts with their balances.
    List,
    /// Set an account's limits, shared by all its keys (every flag left out: no such limit).
    Limits {
        account: String,
        #[command(flatten)]
        limits: Limits,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits in dollars, exactly ("12.50"); more than 0, and the balance stays at most
    /// 9223372.036854775807 USD.
    Add {
        account: String,
        amount_usd: String,
        #[arg(long, default_value = "credit")]
        note: String,
    },
    /// Take dollars from a balance (a refund, a correction); refused if what stays would not
    /// cover the requests in flight, unless --force (then the balance may go below zero).
    Debit {
        account: String,
        amount_usd: String,
        #[arg(long, default_value = "debit")]
        note: String,
        /// Take it even if the balance goes below zero.
        #[arg(long)]
        force: bool,
    },
    /// Show an account's balance.
    Show { account: String },
    /// List ledger entries of an account or of one request.
    Ledger {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key (shown once).
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        name: String,
        /// Expiry in seconds from now.
        #[arg(long)]
        expires_in_seconds: Option<u64>,
        /// Comma-separated model allow-list.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[arg(long)]
        policy_set: Option<String>,
        #[command(flatten)]
        limits: Limits,
    },
    /// List an account's keys (never the secrets).
    List {
        #[arg(long)]
        account: String,
    },
    /// Replace a key by a new one with the same settings (shown once); the old one is revoked.
    Rotate { id: String },
    /// Revoke a key.
    Revoke { id: String },
    /// Lift the suspension or throttle the abnormal-usage guard put on a key.
    Lift {
        id: String,
        /// Who lifts it (recorded).
        #[arg(long, default_value = "cli")]
        by: String,
    },
    /// A key's suspensions and throttles, newest first.
    Suspensions { id: String },
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    #[allow(clippy::print_stdout, reason = "the CLI prints its answer")]
    {
        println!("{text}");
    }
    Ok(())
}

pub async fn accounts(billing: &Billing, cmd: AccountsCommand) -> anyhow::Result<()> {
    match cmd {
        AccountsCommand::Create { name } => print_json(&super::create(billing, &name).await?),
        AccountsCommand::List => print_json(&super::list(billing).await?),
        AccountsCommand::Limits { account, limits } => {
            print_json(&super::set_limits(billing, &account, &limits).await?)
        }
    }
}

pub async fn credits(billing: &Billing, cmd: CreditsCommand) -> anyhow::Result<()> {
    match cmd {
        CreditsCommand::Add {
            account,
            amount_usd,
            note,
        } => {
            let amount = super::parse_amount(&amount_usd)?;
            print_json(&super::credit(billing, &account, amount, &note).await?)
        }
        CreditsCommand::Debit {
            account,
            amount_usd,
            note,
            force,
        } => {
            let amount = super::parse_amount(&amount_usd)?;
            print_json(&super::debit(billing, &account, amount, &note, force).await?)
        }
        CreditsCommand::Show { account } => print_json(&super::get(billing, &account).await?),
        CreditsCommand::Ledger {
            account,
            request_id,
            limit,
        } => {
            if account.is_none() && request_id.is_none() {
                anyhow::bail!("give --account or --request-id");
            }
            print_json(
                &billing
                    .ledger(account.as_deref(), request_id.as_deref(), limit)
                    .await?,
            )
        }
    }
}

/// The key commands; `policies` is the policy folder a new key's `--policy-set` must exist in.
pub async fn keys_cmd(
    billing: &Billing,
    policies: &std::path::Path,
    cmd: KeysCommand,
) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            account,
            name,
            expires_in_seconds,
            models,
            policy_set,
            limits,
        } => {
            let new = NewKey {
                name,
                expires_in_seconds,
                models,
                policy_set,
                limits: Some(limits),
            };
            if new.policy_set.is_some() {
                let compiled = crate::policy::Compiled::load(policies).map_err(|errs| {
                    anyhow::anyhow!(
                        "the policies in {} do not load: {}",
                        policies.display(),
                        errs.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                })?;
                keys::check_policy_set(&new, &compiled)?;
            }
            let (info, plain) = keys::create(billing, &account, new).await?;
            eprintln!("This is the only time the key is shown. Store it now.");
            print_json(&serde_json::json!({"key": plain.expose(), "info": info}))
        }
        KeysCommand::List { account } => print_json(&keys::list(billing, &account).await?),
        KeysCommand::Rotate { id } => {
            let (info, plain) = keys::rotate(billing, &id).await?;
            eprintln!("The old key is revoked. This is the only time the new key is shown.");
            print_json(&serde_json::json!({"key": plain.expose(), "info": info}))
        }
        KeysCommand::Revoke { id } => print_json(&keys::revoke(billing, &id).await?),
        KeysCommand::Lift { id, by } => print_json(&keys::lift(billing, &id, &by).await?),
        KeysCommand::Suspensions { id } => print_json(&keys::suspensions(billing, &id).await?),
    }
}
