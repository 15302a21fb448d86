//! The same behaviour checks run against both counter stores (Redis: the real server).

use super::*;

fn charge(counter: &str, limit: i64, amount: i64, hard: bool) -> Charge {
    Charge {
        counter: counter.to_string(),
        limit,
        amount,
        hard,
        window_end_ms: i64::MAX,
    }
}

async fn behaves(counters: &dyn Counters, prefix: &str) {
    let tag = prefix.to_string();
    // A tenant is usable once its counters are (re)built; here from an empty ledger.
    assert_eq!(counters.begin_seed(&tag, 0).await.unwrap(), Some(0));
    assert_eq!(
        counters.begin_seed(&tag, 0).await.unwrap(),
        None,
        "one rebuild at a time"
    );
    counters.finish_seed(&tag, &[]).await.unwrap();
    let budget = format!("tg:{{{prefix}}}:usd");
    let rpm = format!("tg:{{{prefix}}}:rpm");
    let now = 1_000;
    let far = now + 60_000;
    // All or nothing: the RPM charge fits, the budget does not -> neither is held.
    let denied = counters
        .reserve(
            &tag,
            "r1",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 150, true)],
            now,
            far,
        )
        .await
        .unwrap();
    assert_eq!(
        denied,
        Err(Denied {
            index: 1,
            room: 100
        })
    );
    assert_eq!(counters.read(&rpm).await.unwrap(), (0, 0));

    let rooms = counters
        .reserve(
            &tag,
            "r2",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 60, true)],
            now,
            far,
        )
        .await
        .unwrap();
    assert_eq!(rooms, Ok(vec![9, 40]));
    assert_eq!(
        counters
            .reserve(&tag, "r3", &[charge(&budget, 100, 50, true)], now, far)
            .await
            .unwrap(),
        Err(Denied { index: 0, room: 40 })
    );
    // Soft limits count but never refuse.
    assert_eq!(
        counters
            .reserve(&tag, "r3", &[charge(&budget, 100, 50, false)], now, far)
            .await
            .unwrap(),
        Ok(vec![-10])
    );
    counters
        .settle(
            &tag,
            "r3",
            &[charge(&budget, 100, 0, false)],
            now,
            &Facts::default(),
        )
        .await
        .unwrap();

    // Settle replaces the hold by the real amount, once.
    counters
        .settle(
            &tag,
            "r2",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 45, true)],
            now,
            &Facts::default(),
        )
        .await
        .unwrap();
    counters
        .settle(
            &tag,
            "r2",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 45, true)],
            now,
            &Facts::default(),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (45, 0));

    // A stream that outgrows its hold adds to it under the same request id.
    assert_eq!(
        counters
            .reserve(&tag, "r4", &[charge(&budget, 100, 30, true)], now, far)
            .await
            .unwrap(),
        Ok(vec![25])
    );
    assert_eq!(
        counters
            .reserve(&tag, "r4", &[charge(&budget, 100, 20, true)], now, far)
            .await
            .unwrap(),
        Ok(vec![5])
    );
    assert_eq!(counters.read(&budget).await.unwrap(), (45, 50));
    counters
        .settle(
            &tag,
            "r4",
            &[charge(&budget, 100, 48, true)],
            now,
            &Facts::default(),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (93, 0));

    // The hold of a gateway that died expires and is released by the next reservation.
    assert_eq!(
        counters
            .reserve(&tag, "r5", &[charge(&budget, 100, 7, true)], now, now + 10)
            .await
            .unwrap(),
        Ok(vec![0])
    );
    assert_eq!(
        counters
            .reserve(&tag, "r6", &[charge(&budget, 100, 7, true)], now + 5, far)
            .await
            .unwrap(),
        Err(Denied { index: 0, room: 0 })
    );
    assert_eq!(
        counters
            .reserve(&tag, "r6", &[charge(&budget, 100, 7, true)], now + 11, far)
            .await
            .unwrap(),
        Ok(vec![0])
    );
    // Its late settle still bills what was really used.
    counters
        .settle(
            &tag,
            "r5",
            &[charge(&budget, 100, 2, true)],
            now + 12,
            &Facts::default(),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (95, 7));

    // Settle reports the counted totals, once.
    let totals = counters
        .settle(
            &tag,
            "r6",
            &[charge(&budget, 100, 1, true)],
            now + 13,
            &Facts::default(),
        )
        .await
        .unwrap();
    assert_eq!(totals, vec![96]);
    assert!(counters
        .settle(
            &tag,
            "r6",
            &[charge(&budget, 100, 1, true)],
            now + 14,
            &Facts::default()
        )
        .await
        .unwrap()
        .is_empty());
    // Alert markers fire once.
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    assert!(counters.first_alert(&tag, "b:50", until).await.unwrap());
    assert!(!counters.first_alert(&tag, "b:50", until).await.unwrap());
    assert!(counters.first_alert(&tag, "b:80", until).await.unwrap());
}

/// After counters are lost, a rebuild seeds them from the ledger; settles of requests that ended
/// before the rebuild's epoch are already in that sum and are not counted twice.
async fn rebuilds(counters: &dyn Counters, tag: &str, expect_cold: bool) {
    let budget = format!("tg:{{{tag}}}:usd");
    let far = i64::MAX / 2;
    let cold = counters
        .reserve(tag, "x1", &[charge(&budget, 100, 10, true)], 1_000, far)
        .await;
    assert_eq!(
        cold.is_err(),
        expect_cold,
        "no reservations before the rebuild"
    );
    if !expect_cold {
        // In-process counters are never cold; release that hold.
        counters
            .settle(
                tag,
                "x1",
                &[charge(&budget, 100, 0, true)],
                9_000,
                &Facts::default(),
            )
            .await
            .unwrap();
    }
    let epoch = counters.begin_seed(tag, 5_000).await.unwrap().unwrap();
    assert_eq!(epoch, 5_000);
    // A request that ended before the epoch settles: the ledger sum below already has it.
    counters
        .settle(
            tag,
            "old",
            &[charge(&budget, 100, 30, true)],
            4_000,
            &Facts::default(),
        )
        .await
        .unwrap();
    counters
        .finish_seed(
            tag,
            &[Seed {
                counter: budget.clone(),
                definition: format!("tg:{{{tag}}}:usd-def"),
                amount: 30,
                window_end_ms: i64::MAX,
            }],
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap().0, 30);
    assert_eq!(
        counters
            .reserve(tag, "new", &[charge(&budget, 100, 60, true)], 6_000, far)
            .await
            .unwrap(),
        Ok(vec![10])
    );
    counters
        .settle(
            tag,
            "new",
            &[charge(&budget, 100, 55, true)],
            6_500,
            &Facts::default(),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (85, 0));
}

/// A counter a policy reload adds to a ready tenant is seeded on its own: the ledger sum has
/// requests that ended before its cut-off; every later settle in its scope counts in it, also
/// of requests admitted under the older policy that reserved nothing on it.
async fn seeds_added_counters(counters: &dyn Counters, other: Option<&dyn Counters>, tag: &str) {
    assert!(counters.begin_seed(tag, 0).await.unwrap().is_some());
    counters.finish_seed(tag, &[]).await.unwrap();
    let old = format!("tg:{{{tag}}}:old");
    let new = format!("tg:{{{tag}}}:new");
    let far = i64::MAX / 2;
    let added = Added {
        counter: new.clone(),
        definition: format!("{new}-def"),
        window_start_ms: 0,
        window_end_ms: i64::MAX,
        key: None,
        model: Some("m".into()),
        measure: Measure::Micros,
    };
    let facts = |created_ms: i64, model: &str, cost: i64| Facts {
        created_ms,
        key: "k".into(),
        model: model.into(),
        tokens: 1,
        cost,
    };
    // Admitted under the older policy, before the reload.
    counters
        .reserve(tag, "inflight", &[charge(&old, 1000, 50, true)], 1_000, far)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        counters
            .begin_counter_seed(tag, &added, 5_000)
            .await
            .unwrap(),
        CounterSeed::Seed(5_000)
    );
    if let Some(other) = other {
        assert_eq!(
            other.begin_counter_seed(tag, &added, 5_100).await.unwrap(),
            CounterSeed::Busy,
            "one replica seeds it"
        );
    }
    // Not usable before its seed.
    assert!(counters
        .reserve(tag, "early", &[charge(&new, 1000, 1, true)], 5_000, far)
        .await
        .is_err());
    // Ended before the cut-off: the ledger sum counts it.
    counters
        .settle(
            tag,
            "before",
            &[charge(&old, 1000, 7, true)],
            4_000,
            &facts(3_000, "m", 7),
        )
        .await
        .unwrap();
    // Ended after it, admitted under the older policy: counted from its facts.
    counters
        .settle(
            tag,
            "inflight",
            &[charge(&old, 1000, 20, true)],
            6_000,
            &facts(1_000, "m", 20),
        )
        .await
        .unwrap();
    // Out of its scope: another model, or admitted in an earlier window.
    counters
        .settle(
            tag,
            "other",
            &[charge(&old, 1000, 3, true)],
            6_000,
            &facts(1_000, "x", 3),
        )
        .await
        .unwrap();
    counters
        .settle(
            tag,
            "late",
            &[charge(&old, 1000, 4, true)],
            6_000,
            &facts(-5, "m", 4),
        )
        .await
        .unwrap();
    counters
        .finish_counter_seed(tag, &new, 5_000, 100, i64::MAX)
        .await
        .unwrap();
    assert_eq!(counters.read(&new).await.unwrap(), (120, 0));
    assert_eq!(
        counters
            .begin_counter_seed(tag, &added, 7_000)
            .await
            .unwrap(),
        CounterSeed::Ready
    );
    // Under the new policy it is reserved and settled like any counter (counted once).
    assert_eq!(
        counters
            .reserve(
                tag,
                "new",
                &[charge(&old, 1000, 10, true), charge(&new, 200, 50, true)],
                7_000,
                far
            )
            .await
            .unwrap(),
        Ok(vec![956, 30])
    );
    counters
        .settle(
            tag,
            "new",
            &[charge(&old, 1000, 9, true), charge(&new, 200, 40, true)],
            8_000,
            &facts(7_000, "m", 40),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&new).await.unwrap(), (160, 0));
    assert_eq!(counters.read(&old).await.unwrap(), (43, 0));
}

fn scope(counter: &str, window_start_ms: i64) -> Added {
    Added {
        counter: counter.to_string(),
        definition: format!("{counter}-def"),
        window_start_ms,
        window_end_ms: i64::MAX,
        key: None,
        model: None,
        measure: Measure::Tokens,
    }
}

fn tokens(created_ms: i64, tokens: i64) -> Facts {
    Facts {
        created_ms,
        key: "k".into(),
        model: "m".into(),
        tokens,
        cost: 0,
    }
}

/// Which counters need a seed of their own, and that a seed nobody finished is taken over.
/// `expire_lock`: makes another replica's seeding lock of a counter expire now (Redis).
async fn seeds_counters_new_to_their_window(
    counters: &dyn Counters,
    other: Option<&dyn Counters>,
    tag: &str,
    expire_lock: impl AsyncFn(&str),
) {
    let budget = format!("tg:{{{tag}}}:tokens");
    let early = format!("tg:{{{tag}}}:early");
    // Cold, or being rebuilt (perhaps from a policy without this counter): not yet.
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), 1_000)
            .await
            .unwrap(),
        CounterSeed::Busy
    );
    assert!(counters.begin_seed(tag, 1_000).await.unwrap().is_some());
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), 1_100)
            .await
            .unwrap(),
        CounterSeed::Busy,
        "a rebuild is running"
    );
    // The rebuild seeds (and registers) only `early`; `budget` is new to its window.
    counters
        .finish_seed(
            tag,
            &[Seed {
                counter: early.clone(),
                definition: format!("{early}-def"),
                amount: 3,
                window_end_ms: i64::MAX,
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&early, 0), 2_000)
            .await
            .unwrap(),
        CounterSeed::Ready
    );
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), 2_000)
            .await
            .unwrap(),
        CounterSeed::Seed(2_000)
    );
    // Its seeder fails (the ledger sum errs) and asks again: the same cut-off, still refused.
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), 2_500)
            .await
            .unwrap(),
        CounterSeed::Seed(2_000)
    );
    let far = i64::MAX / 2;
    assert!(counters
        .reserve(tag, "r0", &[charge(&budget, 100, 1, true)], 2_500, far)
        .await
        .is_err());
    if let Some(other) = other {
        // Another replica waits for the seeder's lock, then takes over.
        assert_eq!(
            other
                .begin_counter_seed(tag, &scope(&budget, 0), 2_600)
                .await
                .unwrap(),
            CounterSeed::Busy
        );
        expire_lock(&budget).await;
        assert_eq!(
            other
                .begin_counter_seed(tag, &scope(&budget, 0), 2_700)
                .await
                .unwrap(),
            CounterSeed::Seed(2_000),
            "taken over with the same cut-off"
        );
    }
    // A settle that charged the counter itself and ended before its cut-off is in the ledger
    // sum; one that ended after it counts.
    counters
        .settle(
            tag,
            "before",
            &[charge(&budget, 100, 9, true)],
            1_900,
            &tokens(1_500, 9),
        )
        .await
        .unwrap();
    counters
        .settle(
            tag,
            "after",
            &[charge(&budget, 100, 5, true)],
            2_100,
            &tokens(1_500, 5),
        )
        .await
        .unwrap();
    counters
        .finish_counter_seed(tag, &budget, 2_000, 40, i64::MAX)
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (45, 0));
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), 3_000)
            .await
            .unwrap(),
        CounterSeed::Ready
    );
    // The next window of a known definition began after it appeared: nothing to seed.
    let next = format!("tg:{{{tag}}}:tokens-next");
    let mut later = scope(&next, 2_500);
    later.definition = format!("{budget}-def");
    assert_eq!(
        counters
            .begin_counter_seed(tag, &later, 3_000)
            .await
            .unwrap(),
        CounterSeed::Ready
    );
    // Removed (no replica reports it) and back: it missed what was spent meanwhile.
    let back = 3_000 + DEFINITION_ABSENT_MS + 1;
    assert_eq!(
        counters
            .begin_counter_seed(tag, &scope(&budget, 0), back)
            .await
            .unwrap(),
        CounterSeed::Seed(back)
    );
    counters
        .finish_counter_seed(tag, &budget, back, 70, i64::MAX)
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (70, 0));
    // Settles of requests that reserved nothing on it count from their facts, until the
    // registry forgets the counter (ADDED_MEMORY_MS after its cut-off).
    let old = format!("tg:{{{tag}}}:old");
    counters
        .settle(
            tag,
            "old1",
            &[charge(&old, 100, 2, true)],
            back + 10,
            &tokens(back, 2),
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (72, 0));
    let forgotten = back + ADDED_MEMORY_MS + 1;
    counters
        .settle(
            tag,
            "old2",
            &[charge(&old, 100, 4, true)],
            forgotten,
            &tokens(back, 4),
        )
        .await
        .unwrap();
    counters
        .settle(
            tag,
            "old3",
            &[charge(&old, 100, 8, true)],
            back + 20,
            &tokens(back, 8),
        )
        .await
        .unwrap();
    assert_eq!(
        counters.read(&budget).await.unwrap(),
        (72, 0),
        "pruned from the registry"
    );
}

#[tokio::test]
async fn a_mirrored_settle_that_ended_before_a_counters_cut_off_is_not_counted_twice() {
    let counters = LocalCounters::default();
    let budget = "tg:{m}:tokens";
    counters.begin_seed("m", 0).await.unwrap();
    counters.finish_seed("m", &[]).await.unwrap();
    assert_eq!(
        counters
            .begin_counter_seed("m", &scope(budget, 0), 2_000)
            .await
            .unwrap(),
        CounterSeed::Seed(2_000)
    );
    counters.mirror(
        "m",
        "before",
        &[charge(budget, 100, 9, true)],
        1_900,
        &tokens(1_500, 9),
    );
    counters.mirror(
        "m",
        "after",
        &[charge(budget, 100, 5, true)],
        2_100,
        &tokens(1_500, 5),
    );
    counters
        .finish_counter_seed("m", budget, 2_000, 40, i64::MAX)
        .await
        .unwrap();
    assert_eq!(counters.read(budget).await.unwrap(), (45, 0));
}

#[tokio::test]
async fn local_counters() {
    rebuilds(&LocalCounters::default(), "local-rebuild", false).await;
    seeds_added_counters(&LocalCounters::default(), None, "local-added").await;
    seeds_counters_new_to_their_window(&LocalCounters::default(), None, "local-new", async |_| {})
        .await;
    behaves(&LocalCounters::default(), "local").await;
}

#[tokio::test]
async fn redis_counters() {
    let url =
        std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let counters = RedisCounters::new(&url, std::time::Duration::from_secs(2)).unwrap();
    let prefix = format!(
        "unit-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    behaves(&counters, &prefix).await;
    let other = RedisCounters::new(&url, std::time::Duration::from_secs(2)).unwrap();
    seeds_added_counters(&counters, Some(&other), &format!("{prefix}-added")).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    seeds_counters_new_to_their_window(
        &counters,
        Some(&other),
        &format!("{prefix}-new"),
        async |counter: &str| {
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let _: i64 = redis::cmd("DEL")
                .arg(format!("{counter}:seeding"))
                .query_async(&mut connection)
                .await
                .unwrap();
        },
    )
    .await;
}
