//! Criterion benchmark of the money path on SQLite: authenticate (cached) + reserve + settle,
//! one request's worth. Run: `cargo bench --bench billing`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::accounts::{
    self,
    keys::{self, NewKey},
};
use tollgate::auth::Authenticator;
use tollgate::billing::{Billing, Credits, Price, Usage};
use tollgate::store::Db;

/// One request's money path: authenticate (cached), reserve the estimate, settle the usage.
async fn one_request(
    auth: &Authenticator,
    billing: &Billing,
    key: &str,
    request_id: &str,
    estimate: Credits,
    price: Price,
    usage: Usage,
) -> Credits {
    let caller = auth.authenticate(Some(key)).await.unwrap();
    let hold = billing
        .reserve(
            &caller.account_id,
            &caller.key_id,
            request_id,
            "gpt-4o-mini",
            estimate,
            price,
        )
        .await
        .unwrap();
    hold.settle(usage).await.unwrap()
}

fn money_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let (auth, billing, key, account) = rt.block_on(async {
        let db = Db::connect(&url).await.unwrap();
        let billing = Billing::for_gateway(
            db.clone(),
            tollgate::billing::Settings {
                reservation_ttl: Duration::from_secs(900),
                ..Default::default()
            },
            None,
            &tollgate::background::Background::new(),
        )
        .await
        .unwrap();
        let a = accounts::create(&billing, "bench").await.unwrap();
        accounts::credit(
            &billing,
            &a.id,
            Credits::parse_usd("1000000").unwrap(),
            "bench",
        )
        .await
        .unwrap();
        let (_, key) = keys::create(
            &billing,
            &a.id,
            NewKey {
                name: "k".into(),
                ..NewKey::default()
            },
        )
        .await
        .unwrap();
        (
            Authenticator::new(db, Duration::from_secs(1)),
            billing,
            key.expose().to_string(),
            a.id,
        )
    });
    let price = Price {
        input_per_token: 150_000,
        output_per_token: 600_000,
        ..Price::default()
    };
    let usage = Usage {
        prompt_tokens: 20,
        completion_tokens: 10,
        ..Usage::default()
    };
    let estimate = price.cost(&Usage {
        prompt_tokens: 40,
        completion_tokens: 4096,
        ..Usage::default()
    });
    let mut n = 0u64;
    c.bench_function("billing/authenticate_cached", |b| {
        b.to_async(&rt)
            .iter(|| async { auth.authenticate(Some(&key)).await.unwrap() })
    });
    c.bench_function("billing/authenticate+reserve+settle", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let request_id = format!("bench-{n}");
            let (auth, billing, key) = (&auth, &billing, &key);
            async move {
                one_request(auth, billing, key, &request_id, estimate, price, usage).await
            }
        })
    });
    // The same, waiting until the charge is in the ledger too (what the journal takes off the
    // request path).
    c.bench_function(
        "billing/authenticate+reserve+settle+moved into the ledger",
        |b| {
            b.to_async(&rt).iter(|| {
                n += 1;
                let request_id = format!("bench-{n}");
                let (auth, billing, key) = (&auth, &billing, &key);
                async move {
                    one_request(auth, billing, key, &request_id, estimate, price, usage).await;
                    billing.flush().await.unwrap()
                }
            })
        },
    );
    // The same path for 64 requests at once (the gateway under load): time per request, with
    // charges sharing commits.
    c.bench_function(
        "billing/authenticate+reserve+settle, 64 at once, per request",
        |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (auth, billing, key) = (auth.clone(), billing.clone(), key.clone());
                n += 1;
                let round = n;
                async move {
                    let start = std::time::Instant::now();
                    for i in 0..iters {
                        let mut set = tokio::task::JoinSet::new();
                        for j in 0..64 {
                            let (auth, billing, key) = (auth.clone(), billing.clone(), key.clone());
                            let request_id = format!("bench-{round}-{i}-{j}");
                            set.spawn(async move {
                                one_request(
                                    &auth,
                                    &billing,
                                    &key,
                                    &request_id,
                                    estimate,
                                    price,
                                    usage,
                                )
                                .await
                            });
                        }
                        while set.join_next().await.is_some() {}
                    }
                    start.elapsed() / 64
                }
            })
        },
    );
    rt.block_on(async { assert!(billing.verify(&account).await.unwrap()) });
}

criterion_group!(benches, money_path);
criterion_main!(benches);
