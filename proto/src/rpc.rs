//! Internal RPC between roles (feature `rpc`): the tonic services generated
//! from `proto/internal.proto`, and the mapping between [`ServiceError`] and
//! gRPC status. The [`ErrorCode`] number travels in the `tern-error-code`
//! metadata entry so a remote error reaches the client exactly as a local
//! one would.

use crate::{ErrorCode, ServiceError};

/// Generated messages and services of package `tern.internal.v1`.
pub mod internal {
    include!(concat!(env!("OUT_DIR"), "/tern.internal.v1.rs"));
}

const CODE_KEY: &str = "tern-error-code";

/// Largest internal RPC message, each direction. tonic's 4 MiB default is
/// below what a page of messages, a big member list or a push batch can
/// reach (a request body may be 16 MiB); a message over the limit would
/// break a whole link.
pub const MAX_RPC_MESSAGE: usize = 64 * 1024 * 1024;

fn grpc_code(code: ErrorCode) -> tonic::Code {
    use tonic::Code;
    match code {
        ErrorCode::BadHeader
        | ErrorCode::FrameTooLarge
        | ErrorCode::TruncatedFrame
        | ErrorCode::UnknownRequestType
        | ErrorCode::BadBody
        | ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotLoggedIn | ErrorCode::InvalidToken | ErrorCode::TokenExpired => Code::Unauthenticated,
        ErrorCode::AlreadyLoggedIn | ErrorCode::GroupExists => Code::AlreadyExists,
        ErrorCode::SenderMismatch | ErrorCode::NotGroupMember => Code::PermissionDenied,
        ErrorCode::NoSuchUser | ErrorCode::NoSuchGroup => Code::NotFound,
        ErrorCode::Internal => Code::Internal,
        ErrorCode::Unavailable => Code::Unavailable,
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        let mut status = tonic::Status::new(grpc_code(e.code), e.message);
        if let Ok(value) = (e.code as u32).to_string().parse() {
            status.metadata_mut().insert(CODE_KEY, value);
        }
        status
    }
}

impl From<tonic::Status> for ServiceError {
    /// A status without a tern code is a transport or server failure: it
    /// becomes `UNAVAILABLE` (retry elsewhere) or `INTERNAL`.
    fn from(status: tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .and_then(ErrorCode::from_u32);
        match code {
            Some(code) => ServiceError::new(code, status.message()),
            None => {
                let code = match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                        ErrorCode::Unavailable
                    }
                    _ => ErrorCode::Internal,
                };
                ServiceError::new(code, format!("internal call failed: {}", status.message()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_round_trip() {
        for code in ErrorCode::ALL {
            let status: tonic::Status = ServiceError::new(code, "why").into();
            assert_eq!(ServiceError::from(status), ServiceError::new(code, "why"));
        }
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let e = ServiceError::from(tonic::Status::unavailable("connection refused"));
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(ServiceError::from(tonic::Status::unknown("boom")).code, ErrorCode::Internal);
    }
}
