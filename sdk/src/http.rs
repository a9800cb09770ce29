//! Client of the router-auth HTTP API (register, login, ipList).

use serde::{Deserialize, Serialize};

use crate::ClientError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    pub user_id: String,
    pub token: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessNodeInfo {
    pub node_id: String,
    pub addr: String,
    pub connections: u64,
}

#[derive(Debug, Deserialize)]
struct IpList {
    nodes: Vec<AccessNodeInfo>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    error: String,
    message: String,
}

#[derive(Serialize)]
struct Credentials<'a> {
    user_id: &'a str,
    password: &'a str,
}

/// router-auth at `base` (e.g. `http://127.0.0.1:7880`).
#[derive(Debug, Clone)]
pub struct AuthClient {
    base: String,
    http: reqwest::Client,
}

impl AuthClient {
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into().trim_end_matches('/').to_owned(), http: reqwest::Client::new() }
    }

    async fn check(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        match response.json::<ApiError>().await {
            Ok(e) => Err(ClientError::Http { status, code: e.error, message: e.message }),
            Err(_) => {
                Err(ClientError::Http { status, code: "HTTP".into(), message: format!("status {status}") })
            }
        }
    }

    fn transport(e: reqwest::Error) -> ClientError {
        ClientError::Http { status: 0, code: "UNREACHABLE".into(), message: e.to_string() }
    }

    /// Creates an account. Fails with code `USER_EXISTS` if the id is taken.
    pub async fn register(&self, user_id: &str, password: &str) -> Result<(), ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/register", self.base))
            .json(&Credentials { user_id, password })
            .send()
            .await
            .map_err(Self::transport)?;
        Self::check(response).await.map(|_| ())
    }

    pub async fn login(&self, user_id: &str, password: &str) -> Result<IssuedToken, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/login", self.base))
            .json(&Credentials { user_id, password })
            .send()
            .await
            .map_err(Self::transport)?;
        Self::check(response).await?.json().await.map_err(Self::transport)
    }

    /// Logs in, registering the account first if it does not exist.
    pub async fn login_or_register(&self, user_id: &str, password: &str) -> Result<IssuedToken, ClientError> {
        match self.login(user_id, password).await {
            Err(ClientError::Http { code, .. }) if code == "BAD_CREDENTIALS" => {
                match self.register(user_id, password).await {
                    Ok(()) => {}
                    // Exists: the password was wrong after all.
                    Err(ClientError::Http { code, .. }) if code == "USER_EXISTS" => {
                        return Err(ClientError::Http {
                            status: 401,
                            code: "BAD_CREDENTIALS".into(),
                            message: "wrong password".into(),
                        });
                    }
                    Err(e) => return Err(e),
                }
                self.login(user_id, password).await
            }
            other => other,
        }
    }

    /// Access nodes, least loaded first.
    pub async fn ip_list(&self) -> Result<Vec<AccessNodeInfo>, ClientError> {
        let response =
            self.http.get(format!("{}/v1/ipList", self.base)).send().await.map_err(Self::transport)?;
        Ok(Self::check(response).await?.json::<IpList>().await.map_err(Self::transport)?.nodes)
    }
}
