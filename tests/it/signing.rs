//! outboxd's signer against the independent `standardwebhooks` verifier.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};
use base64::Engine as _;
use outboxd::sign::{Secret, signature_header};
use rand::Rng as _;

fn headers(id: &str, timestamp: i64, signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from(timestamp));
    h.insert(
        "webhook-signature",
        HeaderValue::from_str(signature).unwrap(),
    );
    h
}

fn random_secret(rng: &mut impl rand::Rng) -> String {
    let mut key = vec![0u8; rng.random_range(24..=64)];
    rng.fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

fn random_body(rng: &mut impl rand::Rng) -> String {
    let len = rng.random_range(0..600);
    let text: String = (0..len).map(|_| rng.random::<char>()).collect();
    serde_json::json!({ "text": text, "n": rng.random::<u64>() }).to_string()
}

#[test]
fn signatures_verify_with_standardwebhooks() {
    let mut rng = rand::rng();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for round in 0..200 {
        let secret_text = random_secret(&mut rng);
        let secret = Secret::parse(&secret_text).expect("a valid secret");
        let verifier = standardwebhooks::Webhook::new(&secret_text).unwrap();
        let id = format!("{}", rng.random_range(1..i64::MAX));
        let timestamp = now - rng.random_range(0..60);
        let body = random_body(&mut rng);

        let signature = secret.sign(&id, timestamp, body.as_bytes());
        assert!(signature.starts_with("v1,"), "{signature}");
        verifier
            .verify(body.as_bytes(), &headers(&id, timestamp, &signature))
            .unwrap_or_else(|e| panic!("round {round}: valid signature refused: {e}"));

        // Tampering with the body, the id or the timestamp is detected.
        let mut tampered = body.clone().into_bytes();
        let at = rng.random_range(0..tampered.len());
        tampered[at] = if tampered[at] == b'x' { b'y' } else { b'x' };
        assert!(
            verifier
                .verify(&tampered, &headers(&id, timestamp, &signature))
                .is_err(),
            "round {round}: tampered body accepted"
        );
        let longer = format!("{body} ");
        assert!(
            verifier
                .verify(longer.as_bytes(), &headers(&id, timestamp, &signature))
                .is_err()
        );
        assert!(
            verifier
                .verify(
                    body.as_bytes(),
                    &headers(&format!("{id}0"), timestamp, &signature)
                )
                .is_err()
        );
        assert!(
            verifier
                .verify(body.as_bytes(), &headers(&id, timestamp + 1, &signature))
                .is_err()
        );
        // Another secret does not verify.
        let other = standardwebhooks::Webhook::new(&random_secret(&mut rng)).unwrap();
        assert!(
            other
                .verify(body.as_bytes(), &headers(&id, timestamp, &signature))
                .is_err()
        );
    }
}

#[test]
fn rotation_header_verifies_with_either_secret() {
    let mut rng = rand::rng();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (old, new) = (random_secret(&mut rng), random_secret(&mut rng));
    let secrets = [Secret::parse(&old).unwrap(), Secret::parse(&new).unwrap()];
    let body = random_body(&mut rng);
    let header = signature_header(&secrets, "42", now, body.as_bytes());
    for secret in [&old, &new] {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(body.as_bytes(), &headers("42", now, &header))
            .expect("either secret verifies a rotation header");
    }
}
