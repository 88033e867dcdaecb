//! Many endpoints (issue 16): past a handful of endpoints the claim routes each event
//! type to its endpoints by index (sql/0012) and sizes itself by the deliveries it
//! really makes. Each endpoint still gets exactly the events its filters name, with
//! wildcard, unfiltered, disabled and removed endpoints mixed in, and outboxd's own
//! events keep their rules.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use outboxd::claim;
use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

/// The filter rule, as docs/webhooks.md states it: no filter or `*` takes every event,
/// a name itself, `p.*` every type starting with `p.`; outboxd's own events (`outboxd.`)
/// go only to endpoints whose filters name them (not `*`, not none).
fn matches(filters: &[String], event_type: &str) -> bool {
    let named = filters.iter().any(|f| {
        f == event_type
            || f.strip_suffix('*')
                .is_some_and(|p| p.ends_with('.') && event_type.starts_with(p))
    });
    if event_type.starts_with("outboxd.") {
        named
    } else {
        filters.is_empty() || named || filters.iter().any(|f| f == "*")
    }
}

/// Registers `n` endpoints in one statement, endpoint `i` at `{base}/t/{i}` subscribed to
/// `tenant.{i}.created` only.
async fn add_tenants(db: &TestDb, base: &str, n: i64) {
    db.client
        .execute(
            "INSERT INTO webhook_endpoints (url, secret, event_types, description)
             SELECT $1 || '/t/' || i, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                    ARRAY['tenant.' || i || '.created'], 'tenant ' || i
             FROM generate_series(0, $2::int8 - 1) AS i",
            &[&base, &n],
        )
        .await
        .unwrap();
}

struct EndpointRow {
    id: i64,
    path: String,
    filters: Vec<String>,
    active: bool,
    kept: bool,
}

async fn endpoints(db: &TestDb) -> Vec<EndpointRow> {
    db.client
        .query(
            "SELECT id, url, event_types, active, deleted_at IS NULL FROM webhook_endpoints",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| EndpointRow {
            id: r.get(0),
            path: {
                let url: String = r.get(1);
                url.splitn(4, '/')
                    .nth(3)
                    .map(|p| format!("/{p}"))
                    .unwrap_or(url)
            },
            filters: r.get(2),
            active: r.get(3),
            kept: r.get(4),
        })
        .collect()
}

/// (event id, event type, the endpoint an operational event is about).
async fn events(db: &TestDb) -> Vec<(i64, String, Option<i64>)> {
    db.client
        .query(
            "SELECT id, event_type, about_endpoint_id FROM webhook_outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A thousand endpoints, each subscribed to its own tenant's event, beside a wildcard
/// (`tenant.*`), a narrower wildcard (`tenant.5.*`), one taking everything (no filter),
/// one taking outboxd's own events, one disabled, one removed: every event reaches
/// exactly the endpoints its type matches, a disabled endpoint's deliveries are parked
/// and a removed one gets none, through a real dispatcher and receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_filtered_endpoints_each_receive_exactly_their_events() {
    let db = TestDb::new("many_endpoints").await;
    let receiver = Receiver::start().await;
    let base = receiver.url("");
    let base = base.trim_end_matches('/');
    add_tenants(&db, base, 1_000).await;
    db.add_endpoint(&receiver.url("/wide"), &["tenant.*"]).await;
    db.add_endpoint(&receiver.url("/five"), &["tenant.5.*"])
        .await;
    db.add_endpoint(&receiver.url("/all"), &[]).await;
    db.add_endpoint(&receiver.url("/ops"), &["outboxd.*"]).await;
    let (own, _) = db
        .add_endpoint(&receiver.url("/own"), &["outboxd.endpoint.disabled"])
        .await;
    let (off, _) = db
        .add_endpoint(&receiver.url("/off"), &["tenant.7.created"])
        .await;
    let (gone, _) = db
        .add_endpoint(&receiver.url("/gone"), &["tenant.8.created", "*"])
        .await;
    // Each disable is announced (sql/0010): to /ops, and the one about /off to /own
    // too (parked: /own is disabled by then), never the one about /own to /own.
    outboxd::endpoint::disable(&db.client, off, "test")
        .await
        .unwrap();
    outboxd::endpoint::disable(&db.client, own, "test")
        .await
        .unwrap();
    outboxd::endpoint::remove(&db.client, gone).await.unwrap();

    db.client
        .batch_execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'tenant.' || i || '.created', jsonb_build_object('i', i)
             FROM generate_series(0, 999) AS i",
        )
        .await
        .unwrap();
    for event_type in [
        "tenant.5.updated",
        "tenant.12.created",
        "other.thing",
        "tenant",
    ] {
        db.enqueue(event_type, &json!({})).await;
    }

    let endpoints = endpoints(&db).await;
    let events = events(&db).await;
    // (event, endpoint, parked) for every delivery the rule makes.
    let mut expected = BTreeSet::new();
    for (event, event_type, about) in &events {
        for ep in endpoints.iter().filter(|ep| ep.kept) {
            if matches(&ep.filters, event_type) && *about != Some(ep.id) {
                expected.insert((*event, ep.id, !ep.active));
            }
        }
    }
    let sent = expected.iter().filter(|(_, _, parked)| !parked).count();
    assert!(sent > 1_000 && expected.len() > sent, "the mix is as meant");

    let dispatcher = RunningDispatcher::start(&db.url, test_config("many_endpoints"));
    db.wait_until_within(
        &format!(
            "SELECT count(*) = {} AND bool_and(state IN ('delivered', 'parked'))
                AND NOT EXISTS (SELECT 1 FROM webhook_outbox WHERE processed_at IS NULL)
             FROM webhook_deliveries",
            expected.len()
        ),
        Duration::from_secs(60),
    )
    .await;
    let requests = receiver.wait_for(sent).await;
    dispatcher.stop().await;

    let in_db: BTreeSet<(i64, i64, bool)> = db
        .deliveries()
        .await
        .iter()
        .map(|d| (d.event_id, d.endpoint_id, d.state == "parked"))
        .collect();
    assert_eq!(in_db, expected, "(event, endpoint, parked) in the database");

    let path_of: HashMap<i64, &str> = endpoints.iter().map(|e| (e.id, e.path.as_str())).collect();
    let expected_requests: BTreeSet<(i64, &str)> = expected
        .iter()
        .filter(|(_, _, parked)| !parked)
        .map(|(event, ep, _)| (*event, path_of[ep]))
        .collect();
    let seen: Vec<(i64, &str)> = receiver_pairs(&requests);
    assert_eq!(seen.len(), sent, "one request per (event, endpoint)");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected_requests);
}

fn receiver_pairs(requests: &[crate::harness::Recorded]) -> Vec<(i64, &str)> {
    requests
        .iter()
        .map(|r| (r.event_id(), r.path.as_str()))
        .collect()
}

/// One claim over 1,000 endpoints, each subscribed to its own event type, with one
/// event for each of 300 of them: it fans out as many events as fill its batch, one
/// delivery each, and writes no delivery it does not claim. (Sized as if every event
/// went to every endpoint, it took one event and claimed one delivery.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_fills_its_batch_across_many_endpoints() {
    let db = TestDb::new("many_claim").await;
    add_tenants(&db, "http://127.0.0.1:9", 1_000).await;
    db.client
        .batch_execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'tenant.' || (i * 3) || '.created', '{}'
             FROM generate_series(0, 299) AS i",
        )
        .await
        .unwrap();
    let claimed = claim::claim(&db.client, "w", Duration::from_secs(60), 200)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 200, "a full batch");
    let (rows, processed): (i64, i64) = {
        let row = db
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM webhook_deliveries),
                        (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NOT NULL)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (rows, processed),
        (200, 200),
        "no delivery made beyond the batch"
    );
    // Each went to its own endpoint.
    let strays: i64 = db
        .scalar(
            "SELECT count(*) FROM webhook_deliveries d
             JOIN webhook_outbox o ON o.id = d.event_id
             JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE NOT o.event_type = ANY (e.event_types)",
        )
        .await;
    assert_eq!(strays, 0);
}

/// The filter predicate the claim used to evaluate for every (event, endpoint) pair,
/// word for word (sql/0010 for outboxd's own events): the routed claim must find the
/// same pairs.
const JOINED_PREDICATE: &str = "
SELECT e.id, ep.id
FROM webhook_outbox e
JOIN webhook_endpoints ep
  ON ep.deleted_at IS NULL
 AND CASE WHEN starts_with(e.event_type, 'outboxd.')
     THEN EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                  WHERE f = e.event_type
                     OR (right(f, 2) = '.*' AND starts_with(e.event_type, left(f, -1))))
          AND NOT EXISTS (SELECT 1 FROM webhook_outbox x
                          WHERE x.id = e.id AND x.about_endpoint_id = ep.id)
     ELSE cardinality(ep.event_types) = 0
          OR e.event_type = ANY (ep.event_types)
          OR EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                     WHERE f = '*'
                        OR (right(f, 2) = '.*' AND starts_with(e.event_type, left(f, -1))))
     END";

/// Awkward names and filters, some only the SQL route can register (`a..*`, `.*`):
/// with few endpoints (joined) and with many (routed), the claims make exactly the
/// deliveries the filter predicate names, no more, no fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_and_joined_claims_match_the_same_pairs() {
    for padding in [0_i64, 40] {
        let db = TestDb::new("many_match").await;
        let filters: &[&[&str]] = &[
            &[],
            &["*"],
            &["a"],
            &["a.*"],
            &["a.b", "a.*"],
            &["a.b.*"],
            &["ab.*"],
            &["a..*"],
            &[".*"],
            &["a-b:c.*"],
            &["outboxd.*"],
            &["outboxd.delivery.*", "*"],
            &["outboxd.endpoint.disabled"],
        ];
        for f in filters {
            let f: Vec<String> = f.iter().map(|s| (*s).to_owned()).collect();
            db.client
                .execute(
                    "INSERT INTO webhook_endpoints (url, secret, event_types)
                     VALUES ('http://127.0.0.1:9/x', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', $1)",
                    &[&f],
                )
                .await
                .unwrap();
        }
        db.client
            .execute(
                "INSERT INTO webhook_endpoints (url, secret, event_types)
                 SELECT 'http://127.0.0.1:9/p', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                        ARRAY['pad.' || i]
                 FROM generate_series(1, $1::int8) AS i",
                &[&padding],
            )
            .await
            .unwrap();
        // An operational event about the endpoint subscribed to it, one about nobody.
        let about: i64 = db
            .scalar("SELECT id FROM webhook_endpoints WHERE event_types = '{outboxd.endpoint.disabled}'")
            .await;
        db.client
            .execute(
                "INSERT INTO webhook_outbox (event_type, payload, about_endpoint_id)
                 VALUES ('outboxd.endpoint.disabled', '{}', $1),
                        ('outboxd.delivery.dead', '{}', NULL)",
                &[&about],
            )
            .await
            .unwrap();
        for t in [
            "a", "a.", "a.b", "a.b.c", "ab", "ab.c", "a..b", ".a", "b", "a-b:c.d", "a-b:c", "A.b",
            "pad.1", "pad.1.x",
        ] {
            db.enqueue(t, &json!({})).await;
        }
        let expected: BTreeSet<(i64, i64)> = db
            .client
            .query(JOINED_PREDICATE, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert!(expected.len() > 20, "the mix is as meant");
        // Claims until every event is fanned out; small batches, so several claims
        // each route part of the events.
        for _ in 0..100 {
            claim::claim(&db.client, "w", Duration::from_secs(60), 7)
                .await
                .unwrap();
            let left: i64 = db
                .scalar("SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL")
                .await;
            if left == 0 {
                break;
            }
        }
        let made: BTreeSet<(i64, i64)> = db
            .deliveries()
            .await
            .iter()
            .map(|d| (d.event_id, d.endpoint_id))
            .collect();
        assert_eq!(made, expected, "with {padding} more endpoints");
    }
}
