//! The ledger table, the same on both backends: the one statement that writes charges, the
//! operator's credits and debits with their range checks, and the reads (entries, a key's spend,
//! the balance check of `verify`).
//!
//! Every insert moves `accounts.balance` by its amount in the same transaction (a trigger), so
//! nothing here updates a balance itself; the range checks lock the account row first (a
//! conditional UPDATE), so the check and the insert are one atomic step whoever else writes.

use std::collections::HashSet;
use std::fmt::Write as _;

use futures::TryStreamExt as _;

use crate::store::{Db, now_ms};

use super::{BillingError, Credits, MAX_BALANCE};

/// One ledger charge, as it is journaled and inserted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    pub id: String,
    pub account_id: String,
    pub key_id: String,
    pub request_id: String,
    pub model: String,
    pub cost: Credits,
    /// What the charge takes beyond the request's reservation (its usage is charged in full);
    /// 0 within it. Journals of earlier versions have none.
    #[serde(default)]
    pub overrun: Credits,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub images: i64,
    pub seconds: i64,
    pub created_at: i64,
}

impl Charge {
    /// Charge at most `most` (what keeps the balance at or above `-MAX_BALANCE`), taking the cut
    /// from the overrun.
    pub(super) fn cap(&mut self, most: i64) {
        let most = most.max(0);
        if self.cost.0 > most {
            let cut = self.cost.0 - most;
            self.cost = Credits(most);
            self.overrun = Credits(self.overrun.0.saturating_sub(cut).max(0));
        }
    }
}

/// One ledger line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerEntry {
    pub id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub request_id: Option<String>,
    pub model: Option<String>,
    pub kind: String,
    pub amount: i64,
    pub amount_usd: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of a charge: what it took beyond the request's reservation.
    pub overrun: i64,
    pub note: Option<String>,
    pub created_at: i64,
}

/// An operator's entry on an account (never a charge: only a settled request charges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adjustment {
    /// Money in: refused if the balance would pass [`MAX_BALANCE`].
    Credit,
    /// Money out: refused if the balance would fall below what open reservations hold.
    Debit,
    /// Money out whatever is held, even below zero (but never below `-MAX_BALANCE`).
    ForcedDebit,
}

impl Adjustment {
    /// The ledger `kind` of the entry.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Credit => "credit",
            Self::Debit => "debit",
            Self::ForcedDebit => "forced_debit",
        }
    }

    /// The signed ledger amount of a positive `amount`.
    pub fn signed(self, amount: Credits) -> Credits {
        match self {
            Self::Credit => amount,
            Self::Debit | Self::ForcedDebit => Credits(-amount.0),
        }
    }
}

/// Why an operator's entry was refused (the balance is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the amount must be more than 0")]
    NotPositive,
    #[error(
        "the balance ({balance} USD) would pass its maximum of {max} USD; credit at most the difference"
    )]
    AboveMax { balance: Credits, max: Credits },
    #[error(
        "the debit would take the balance below what is free to take ({free} USD: the balance minus what requests in flight hold); force it to go below"
    )]
    Overdraw { free: Credits },
    #[error("the balance ({balance} USD) would fall below its minimum of {min} USD")]
    BelowMin { balance: Credits, min: Credits },
}

type LedgerRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    i64,
);

fn entry(r: LedgerRow) -> LedgerEntry {
    LedgerEntry {
        id: r.0,
        account_id: r.1,
        key_id: r.2,
        request_id: r.3,
        model: r.4,
        kind: r.5,
        amount: r.6,
        amount_usd: Credits(r.6).to_string(),
        prompt_tokens: r.7,
        completion_tokens: r.8,
        overrun: r.9,
        note: r.10,
        created_at: r.11,
    }
}

const LEDGER_COLUMNS: &str = "id, account_id, key_id, request_id, model, kind, amount, prompt_tokens, completion_tokens, overrun, note, created_at";

/// Append charges to the ledger in one statement (the ledger trigger moves each account's
/// balance row by row); a request charged already is skipped. Returns the request ids
/// inserted. The one place charges are written, on both backends.
pub(super) async fn insert_charges<'e, E>(
    executor: E,
    batch: &[Charge],
) -> Result<HashSet<String>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    const COLUMNS: usize = 12;
    let mut sql = String::from(
        "INSERT INTO ledger (id, account_id, key_id, request_id, model, kind, amount, prompt_tokens, completion_tokens, images, seconds, created_at, overrun) VALUES ",
    );
    for i in 0..batch.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        let p = i * COLUMNS;
        // Writing into the one buffer: no string per row.
        let _ = write!(
            sql,
            "(${}, ${}, ${}, ${}, ${}, 'charge', ${}, ${}, ${}, ${}, ${}, ${}, ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7,
            p + 8,
            p + 9,
            p + 10,
            p + 11,
            p + 12
        );
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING request_id");
    let mut q = sqlx::query_scalar::<_, String>(&sql);
    for c in batch {
        q = q
            .bind(c.id.as_str())
            .bind(c.account_id.as_str())
            .bind(c.key_id.as_str())
            .bind(c.request_id.as_str())
            .bind(c.model.as_str())
            .bind(-c.cost.0)
            .bind(c.prompt_tokens)
            .bind(c.completion_tokens)
            .bind(c.images)
            .bind(c.seconds)
            .bind(c.created_at)
            .bind(c.overrun.0);
    }
    Ok(q.fetch_all(executor).await?.into_iter().collect())
}

/// Post an operator's entry of `amount` (> 0) on an account, checked against the stored balance
/// in the same transaction: lock the account row only if the entry keeps the balance in range,
/// then insert (the trigger moves the balance). The range is `[-MAX_BALANCE, MAX_BALANCE]`,
/// and for a plain debit what stays must cover the stored `reserved` (open reservation rows).
pub(super) async fn post(
    db: &Db,
    account_id: &str,
    adjustment: Adjustment,
    amount: Credits,
    note: &str,
) -> Result<Result<LedgerEntry, Refusal>, BillingError> {
    if amount.0 <= 0 {
        return Ok(Err(Refusal::NotPositive));
    }
    // Bounds computed here, never in SQL, so no arithmetic in the database can overflow:
    // `balance + amount <= MAX` is `balance <= MAX - amount`, and so on (0 < amount <= MAX).
    let (check, bound) = match adjustment {
        Adjustment::Credit => ("balance <= $2", MAX_BALANCE.0 - amount.0),
        Adjustment::Debit => ("balance - reserved >= $2", amount.0),
        Adjustment::ForcedDebit => ("balance >= $2", amount.0 - MAX_BALANCE.0),
    };
    let mut tx = db.pool.begin().await?;
    // A write first: on PostgreSQL it locks the row (and re-checks the condition on the newest
    // version), on SQLite it takes the one write lock.
    let locked = sqlx::query(&format!(
        "UPDATE accounts SET balance = balance WHERE id = $1 AND {check}"
    ))
    .bind(account_id)
    .bind(bound)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if locked != 1 {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        tx.rollback().await?;
        let (balance, reserved) = row.ok_or(BillingError::NoAccount)?;
        return Ok(Err(match adjustment {
            Adjustment::Credit => Refusal::AboveMax {
                balance: Credits(balance),
                max: MAX_BALANCE,
            },
            Adjustment::Debit => Refusal::Overdraw {
                free: Credits(balance.saturating_sub(reserved)),
            },
            Adjustment::ForcedDebit => Refusal::BelowMin {
                balance: Credits(balance),
                min: Credits(-MAX_BALANCE.0),
            },
        }));
    }
    let id = ulid::Ulid::new().to_string();
    sqlx::query(
        "INSERT INTO ledger (id, account_id, kind, amount, note, created_at, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(account_id)
    .bind(adjustment.kind())
    .bind(adjustment.signed(amount).0)
    .bind(note)
    .bind(now_ms())
    .bind(format!("{}-{id}", adjustment.kind()))
    .execute(&mut *tx)
    .await?;
    let row: LedgerRow = sqlx::query_as(&format!(
        "SELECT {LEDGER_COLUMNS} FROM ledger WHERE id = $1"
    ))
    .bind(&id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(entry(row)))
}

/// The id of an account named by id or by name.
pub(super) async fn account_id(db: &Db, id_or_name: &str) -> Result<String, BillingError> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT id FROM accounts WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .fetch_optional(&db.pool)
            .await?;
    Ok(row.ok_or(BillingError::NoAccount)?.0)
}

/// Ledger lines of an account (newest first), or of one request.
pub(super) async fn entries(
    db: &Db,
    account: Option<&str>,
    request_id: Option<&str>,
    limit: i64,
) -> Result<Vec<LedgerEntry>, BillingError> {
    let rows: Vec<LedgerRow> = match (account, request_id) {
        (_, Some(r)) => {
            sqlx::query_as(&format!(
                "SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = $1 ORDER BY id"
            ))
            .bind(r)
            .fetch_all(&db.pool)
            .await?
        }
        (Some(a), None) => {
            let id = account_id(db, a).await?;
            sqlx::query_as(&format!(
                "SELECT {LEDGER_COLUMNS} FROM ledger WHERE account_id = $1 ORDER BY id DESC LIMIT $2"
            ))
            .bind(&id)
            .bind(limit)
            .fetch_all(&db.pool)
            .await?
        }
        (None, None) => Vec::new(),
    };
    Ok(rows.into_iter().map(entry).collect())
}

/// What a key was charged since `since_ms`.
pub(super) async fn spent_by_key_since(
    db: &Db,
    account_id: &str,
    key_id: &str,
    since_ms: i64,
) -> Result<Credits, BillingError> {
    let (spent,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(-amount), 0) AS BIGINT) FROM ledger \
         WHERE account_id = $1 AND created_at >= $2 AND key_id = $3 AND kind = 'charge'",
    )
    .bind(account_id)
    .bind(since_ms)
    .bind(key_id)
    .fetch_one(&db.pool)
    .await?;
    Ok(Credits(spent))
}

/// What an account was charged since `since_ms` (all its keys).
pub(super) async fn spent_by_account_since(
    db: &Db,
    account_id: &str,
    since_ms: i64,
) -> Result<Credits, BillingError> {
    let (spent,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(-amount), 0) AS BIGINT) FROM ledger \
         WHERE account_id = $1 AND created_at >= $2 AND kind = 'charge'",
    )
    .bind(account_id)
    .bind(since_ms)
    .fetch_one(&db.pool)
    .await?;
    Ok(Credits(spent))
}

/// The stored balance equals the sum of the ledger, the stored `reserved` equals the open
/// reservation rows, and the balance is below zero only if a forced debit took it there or by
/// at most what charges took beyond their reservations (their `overrun`).
pub(super) async fn verify(db: &Db, account_id: &str) -> Result<bool, BillingError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&db.pool)
            .await?;
    let (balance, reserved) = row.ok_or(BillingError::NoAccount)?;
    // Summed here, wide: SQLite's SUM fails on an overflow in the middle, whose occurrence
    // depends on the order it reads the rows in (credits to the maximum, then debits).
    let (mut sum, mut forced, mut overrun) = (0_i128, false, 0_i128);
    let mut rows = sqlx::query_as::<_, (i64, String, i64)>(
        "SELECT amount, kind, overrun FROM ledger WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch(&db.pool);
    while let Some((amount, kind, over)) = rows.try_next().await? {
        sum += i128::from(amount);
        forced |= kind == Adjustment::ForcedDebit.kind();
        if kind == "charge" {
            overrun += i128::from(over.max(0));
        }
    }
    drop(rows);
    let (open,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM reservations WHERE account_id = $1 AND state = 'open'",
    )
    .bind(account_id)
    .fetch_one(&db.pool)
    .await?;
    let in_range = forced || i128::from(balance) >= -overrun;
    Ok(sum == i128::from(balance) && open == reserved && in_range)
}
