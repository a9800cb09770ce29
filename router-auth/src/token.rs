//! Signed, expiring login tokens: `v1.<claims>.<mac>`, where `claims` is the
//! base64url JSON `{"sub","iat","exp"}` (milliseconds since the Unix epoch)
//! and `mac` the base64url HMAC-SHA256 of `v1.<claims>` under the cluster's
//! token secret. Access nodes verify tokens without a round trip.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tern_proto::{ErrorCode, ServiceError, ServiceResult};

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
}

/// Issues and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner { secret: <redacted> }")
    }
}

impl TokenSigner {
    /// `secret` should be at least 32 random bytes.
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    pub fn issue(&self, user_id: &str, now_ms: u64, ttl_ms: u64) -> (String, Claims) {
        let claims = Claims { sub: user_id.to_owned(), iat: now_ms, exp: now_ms + ttl_ms };
        let json = serde_json::to_vec(&claims).expect("claims serialize");
        let signed = format!("{VERSION}.{}", B64.encode(json));
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let tag = B64.encode(mac.finalize().into_bytes());
        (format!("{signed}.{tag}"), claims)
    }

    /// Checks format, signature (in constant time) and expiry.
    pub fn verify(&self, token: &str, now_ms: u64) -> ServiceResult<Claims> {
        let invalid = |why: &str| ServiceError::new(ErrorCode::InvalidToken, format!("invalid token: {why}"));
        let (signed, tag) = token.rsplit_once('.').ok_or_else(|| invalid("malformed"))?;
        let (version, claims_b64) = signed.split_once('.').ok_or_else(|| invalid("malformed"))?;
        if version != VERSION {
            return Err(invalid("unknown version"));
        }
        let tag = B64.decode(tag).map_err(|_| invalid("malformed signature"))?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        mac.verify_slice(&tag).map_err(|_| invalid("bad signature"))?;
        let json = B64.decode(claims_b64).map_err(|_| invalid("malformed claims"))?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| invalid("malformed claims"))?;
        if now_ms >= claims.exp {
            return Err(ServiceError::new(ErrorCode::TokenExpired, "token expired: log in again"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_then_verify() {
        let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let (token, claims) = signer.issue("alice", 1_000, 60_000);
        assert_eq!(signer.verify(&token, 2_000).unwrap(), claims);
        assert_eq!(claims.sub, "alice");
    }

    #[test]
    fn expired_token_is_rejected() {
        let signer = TokenSigner::new(vec![7; 32]);
        let (token, _) = signer.issue("alice", 1_000, 10);
        assert_eq!(signer.verify(&token, 1_010).unwrap_err().code, ErrorCode::TokenExpired);
    }

    #[test]
    fn tampered_or_foreign_tokens_are_rejected() {
        let signer = TokenSigner::new(vec![7; 32]);
        let (token, _) = signer.issue("alice", 1_000, 60_000);
        let forged_claims = B64.encode(br#"{"sub":"mallory","iat":1000,"exp":99999999}"#);
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("v1.{forged_claims}.{}", parts[2]);
        for bad in [forged.as_str(), "garbage", "v1.x.y", "", "v2.a.b"] {
            assert_eq!(signer.verify(bad, 2_000).unwrap_err().code, ErrorCode::InvalidToken, "{bad}");
        }
        let other = TokenSigner::new(vec![8; 32]);
        assert_eq!(other.verify(&token, 2_000).unwrap_err().code, ErrorCode::InvalidToken);
    }
}
