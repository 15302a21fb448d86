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
    let budget = format!("tg:{{{prefix}}}:usd");
    let rpm = format!("tg:{{{prefix}}}:rpm");
    let now = 1_000;
    let far = now + 60_000;
    // All or nothing: the RPM charge fits, the budget does not -> neither is held.
    let denied = counters
        .reserve(
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
            .reserve("r3", &[charge(&budget, 100, 50, true)], now, far)
            .await
            .unwrap(),
        Err(Denied { index: 0, room: 40 })
    );
    // Soft limits count but never refuse.
    assert_eq!(
        counters
            .reserve("r3", &[charge(&budget, 100, 50, false)], now, far)
            .await
            .unwrap(),
        Ok(vec![-10])
    );
    counters
        .settle("r3", &[charge(&budget, 100, 0, false)], now)
        .await
        .unwrap();

    // Settle replaces the hold by the real amount, once.
    counters
        .settle(
            "r2",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 45, true)],
            now,
        )
        .await
        .unwrap();
    counters
        .settle(
            "r2",
            &[charge(&rpm, 10, 1, true), charge(&budget, 100, 45, true)],
            now,
        )
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (45, 0));

    // A stream that outgrows its hold adds to it under the same request id.
    assert_eq!(
        counters
            .reserve("r4", &[charge(&budget, 100, 30, true)], now, far)
            .await
            .unwrap(),
        Ok(vec![25])
    );
    assert_eq!(
        counters
            .reserve("r4", &[charge(&budget, 100, 20, true)], now, far)
            .await
            .unwrap(),
        Ok(vec![5])
    );
    assert_eq!(counters.read(&budget).await.unwrap(), (45, 50));
    counters
        .settle("r4", &[charge(&budget, 100, 48, true)], now)
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (93, 0));

    // The hold of a gateway that died expires and is released by the next reservation.
    assert_eq!(
        counters
            .reserve("r5", &[charge(&budget, 100, 7, true)], now, now + 10)
            .await
            .unwrap(),
        Ok(vec![0])
    );
    assert_eq!(
        counters
            .reserve("r6", &[charge(&budget, 100, 7, true)], now + 5, far)
            .await
            .unwrap(),
        Err(Denied { index: 0, room: 0 })
    );
    assert_eq!(
        counters
            .reserve("r6", &[charge(&budget, 100, 7, true)], now + 11, far)
            .await
            .unwrap(),
        Ok(vec![0])
    );
    // Its late settle still bills what was really used.
    counters
        .settle("r5", &[charge(&budget, 100, 2, true)], now + 12)
        .await
        .unwrap();
    assert_eq!(counters.read(&budget).await.unwrap(), (95, 7));
}

#[tokio::test]
async fn local_counters() {
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
}
