//! The router-auth HTTP API (JSON over HTTP/1.1):
//!
//! | method and path      | body                        | success                                   |
//! |----------------------|-----------------------------|-------------------------------------------|
//! | `POST /v1/register`  | `{"user_id","password"}`    | 201 `{"user_id"}`                         |
//! | `POST /v1/login`     | `{"user_id","password"}`    | 200 `{"user_id","token","expires_at_ms"}` |
//! | `GET /v1/ipList[?user=ID]` |                       | 200 `{"nodes":[{"node_id","role","addr","internal_addr","connections"}]}`, in the configured selection order (default least loaded first) |
//! | `GET /healthz`       |                             | 200 `ok`                                  |
//!
//! Errors are `{"error": CODE, "message": text}` with CODE one of
//! `INVALID_ARGUMENT` (400), `BAD_JSON` (400), `USER_EXISTS` (409),
//! `BAD_CREDENTIALS` (401), `BUSY` (503: too many password checks at once;
//! retry), `INTERNAL` (500).

use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tern_store::NodeInfo;
use tokio::net::TcpListener;

use crate::{AccountError, AuthService, IssuedToken};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub user_id: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub user_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpListResponse {
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
    pub message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorResponse { error: code.to_owned(), message: message.into() })).into_response()
}

impl IntoResponse for AccountError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            AccountError::Invalid(_) => error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message),
            AccountError::UserExists(_) => error(StatusCode::CONFLICT, "USER_EXISTS", message),
            AccountError::BadCredentials => error(StatusCode::UNAUTHORIZED, "BAD_CREDENTIALS", message),
            AccountError::Busy => error(StatusCode::SERVICE_UNAVAILABLE, "BUSY", message),
            AccountError::Internal(_) => {
                tracing::error!(%message, "router-auth request failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error")
            }
        }
    }
}

fn bad_json(rejection: JsonRejection) -> Response {
    error(StatusCode::BAD_REQUEST, "BAD_JSON", rejection.body_text())
}

async fn register(
    State(service): State<Arc<AuthService>>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Response {
    let Json(creds) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_json(rejection),
    };
    match service.register(&creds.user_id, &creds.password).await {
        Ok(()) => (StatusCode::CREATED, Json(RegisterResponse { user_id: creds.user_id })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn login(
    State(service): State<Arc<AuthService>>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Response {
    let Json(creds) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_json(rejection),
    };
    match service.login(&creds.user_id, &creds.password).await {
        Ok(token) => Json::<IssuedToken>(token).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct IpListQuery {
    user: Option<String>,
}

async fn ip_list(State(service): State<Arc<AuthService>>, Query(query): Query<IpListQuery>) -> Response {
    match service.ip_list(query.user.as_deref()).await {
        Ok(nodes) => Json(IpListResponse { nodes }).into_response(),
        Err(e) => AccountError::Internal(e.message).into_response(),
    }
}

pub fn router(service: Arc<AuthService>) -> Router {
    Router::new()
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/ipList", get(ip_list))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(service)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight.
pub async fn serve(
    service: Arc<AuthService>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(service)).with_graceful_shutdown(shutdown).await
}
