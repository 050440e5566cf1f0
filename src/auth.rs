//! Client authentication: keys are stored only as SHA-256 digests, so a leaked manifest or
//! environment never leaks a usable key.

use crate::error::ApiError;
use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of a client key, the form `client_keys` holds.
pub fn digest_hex(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}

/// Checks an `Authorization` header value against the accepted digests; on success, the key's
/// digest (which names the tenant: budgets and caches are kept per client key).
pub fn check(digests: &[String], authorization: Option<&str>) -> Result<String, ApiError> {
    let token = authorization
        .map(str::trim)
        .and_then(|h| {
            h.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| h[7..].trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::missing_key)?;
    if digests.is_empty() {
        return Err(ApiError::no_keys_configured());
    }
    let got = digest_hex(token);
    // Compare every digest in full, so timing does not tell how much of a digest matched.
    let ok = digests.iter().fold(false, |acc, d| {
        let same = d.len() == got.len()
            && d.bytes()
                .zip(got.bytes())
                .fold(0u8, |x, (a, b)| x | (a ^ b))
                == 0;
        acc | same
    });
    if ok {
        Ok(got)
    } else {
        Err(ApiError::invalid_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_known_vector() {
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_checks() {
        let digests = vec![digest_hex("fr-good")];
        assert_eq!(
            check(&digests, Some("Bearer fr-good")).unwrap(),
            digest_hex("fr-good")
        );
        assert!(check(&digests, Some("bearer  fr-good ")).is_ok());
        assert_eq!(
            check(&digests, None).unwrap_err().code,
            Some("missing_api_key")
        );
        assert_eq!(
            check(&digests, Some("Basic abc")).unwrap_err().code,
            Some("missing_api_key")
        );
        assert_eq!(
            check(&digests, Some("Bearer fr-bad")).unwrap_err().code,
            Some("invalid_api_key")
        );
        assert_eq!(
            check(&[], Some("Bearer fr-good")).unwrap_err().code,
            Some("invalid_api_key")
        );
    }
}
