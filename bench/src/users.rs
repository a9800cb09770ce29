//! Benchmark accounts and their tokens.
//!
//! Passwords are hashed with Argon2 on purpose, so registering and logging
//! in costs tens of milliseconds of server CPU each. The benchmark pays it
//! once per account and target, keeps the tokens, and reuses a token for
//! many connections with different device ids where a scenario needs
//! thousands of connections (S1, S2).

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Context;
use futures::StreamExt;
use tern_sdk::AuthClient;

pub const PASSWORD: &str = "tern-bench-password";

/// Tokens of one target, fetched on first use.
pub struct Users {
    auth: AuthClient,
    tokens: Mutex<HashMap<String, String>>,
}

impl Users {
    pub fn new(auth_url: &str) -> Self {
        Self { auth: AuthClient::new(auth_url), tokens: Mutex::default() }
    }

    /// The same accounts and tokens behind a new router-auth address (a
    /// restarted server on the same data directory).
    pub fn moved_to(&self, auth_url: &str) -> Users {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Users { auth: AuthClient::new(auth_url), tokens: Mutex::new(tokens) }
    }

    /// Tokens for `ids`, in order; registers accounts that do not exist.
    pub async fn tokens(&self, ids: &[String]) -> anyhow::Result<Vec<String>> {
        let missing: Vec<String> = {
            let known = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter().filter(|id| !known.contains_key(*id)).cloned().collect()
        };
        if !missing.is_empty() {
            eprintln!("  preparing {} account(s) (Argon2 hashing on the server)…", missing.len());
            // Two at a time per core: the server hashes, the machine has two.
            let fetched: Vec<anyhow::Result<(String, String)>> = futures::stream::iter(missing)
                .map(|id| async move {
                    let t = self
                        .auth
                        .login_or_register(&id, PASSWORD)
                        .await
                        .with_context(|| format!("login of {id}"))?;
                    Ok((id, t.token))
                })
                .buffer_unordered(4)
                .collect()
                .await;
            let mut known = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            for r in fetched {
                let (id, token) = r?;
                known.insert(id, token);
            }
        }
        let known = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        Ok(ids.iter().map(|id| known[id].clone()).collect())
    }
}
