//! Standard Webhooks signatures (`v1`, HMAC-SHA256).
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the header value is
//! `v1,` + base64 of the MAC, keyed by the base64-decoded part of a `whsec_` secret.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
/// The spec asks for 24 to 64 bytes of key.
const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// Why a secret string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSecret {
    /// The secret lacks the `whsec_` prefix.
    #[error("a signing secret must start with \"whsec_\"")]
    MissingPrefix,
    /// The part after the prefix is not standard base64.
    #[error("the part of the secret after \"whsec_\" is not valid base64")]
    NotBase64,
    /// The decoded key is shorter or longer than the spec allows.
    #[error("the secret's key must be 24 to 64 bytes, got {0}")]
    BadLength(usize),
}

/// A parsed signing secret. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>`; the decoded key must be 24 to 64 bytes.
    pub fn parse(secret: &str) -> Result<Self, InvalidSecret> {
        let encoded = secret
            .strip_prefix(PREFIX)
            .ok_or(InvalidSecret::MissingPrefix)?;
        let key = BASE64
            .decode(encoded)
            .map_err(|_| InvalidSecret::NotBase64)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(InvalidSecret::BadLength(key.len()));
        }
        Ok(Self { key })
    }

    /// A fresh secret: `whsec_` + base64 of 32 bytes from a CSPRNG (rand's thread
    /// generator, seeded from the operating system).
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{PREFIX}{}", BASE64.encode(key))
    }

    /// The `v1,<base64>` signature entry for one message.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header value: one space-separated entry per secret, so a
/// consumer holding any of them (old or new, during a rotation) can verify.
pub fn signature_header(secrets: &[Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a `webhook-signature` header as a consumer would: true if any `v1,` entry
/// matches (compared in constant time). Timestamp freshness is the caller's check.
pub fn verify(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = secret.sign(msg_id, timestamp, body);
    header
        .split(' ')
        .filter(|entry| entry.starts_with("v1,"))
        .fold(false, |found, entry| {
            found | constant_time_eq(entry.as_bytes(), expected.as_bytes())
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors published with the Standard Webhooks reference libraries.
    #[test]
    fn reproduces_published_vectors() {
        let cases = [
            (
                "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                r#"{"email":"test@example.com","username":"test_user"}"#,
                "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            ),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#,
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ];
        for (secret, id, ts, body, expected) in cases {
            let secret = Secret::parse(secret).unwrap();
            assert_eq!(secret.sign(id, ts, body.as_bytes()), expected);
        }
    }

    #[test]
    fn header_carries_one_entry_per_secret() {
        let a = Secret::parse(&Secret::generate()).unwrap();
        let b = Secret::parse(&Secret::generate()).unwrap();
        let header = signature_header(&[a.clone(), b.clone()], "1", 10, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries, [a.sign("1", 10, b"{}"), b.sign("1", 10, b"{}")]);
    }

    #[test]
    fn verify_accepts_any_matching_entry() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            b"{\"test\": 2432232314}",
        );
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(verify(&secret, id, ts, body, good));
        assert!(verify(
            &secret,
            id,
            ts,
            body,
            &format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,x {good}")
        ));
        assert!(!verify(
            &secret,
            id,
            ts,
            body,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        ));
        assert!(!verify(&secret, id, ts + 1, body, good));
        assert!(!verify(&secret, id, ts, body, ""));
    }

    #[test]
    fn generated_secrets_parse_and_differ() {
        let one = Secret::generate();
        let two = Secret::generate();
        assert_ne!(one, two);
        assert!(one.starts_with("whsec_"));
        assert_eq!(Secret::parse(&one).unwrap().key.len(), 32);
    }

    #[test]
    fn refuses_malformed_secrets() {
        assert_eq!(
            Secret::parse("C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
            Err(InvalidSecret::MissingPrefix)
        );
        assert_eq!(Secret::parse("whsec_!!!"), Err(InvalidSecret::NotBase64));
        assert_eq!(
            Secret::parse("whsec_c2hvcnQ="),
            Err(InvalidSecret::BadLength(5))
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let secret = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
