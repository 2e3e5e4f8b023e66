//! The driver's error type and its one mapping to gRPC status codes.

/// An error a CSI call returns. Each variant is one gRPC code; the message
/// says what was wrong with which field or volume.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a value is malformed (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume or node does not exist (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// A volume with this name exists with other parameters, or a
    /// publication conflicts with an existing one (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// No placement fits the request (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same volume is in flight (`ABORTED`).
    #[error("{0}")]
    Aborted(String),
    /// The request cannot be done in the volume's current state
    /// (`FAILED_PRECONDITION`), e.g. it is published on another node.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The requested capacity cannot be provided (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// Not implemented in this version (`UNIMPLEMENTED`).
    #[error("{0}")]
    Unimplemented(String),
    /// Anything else: store or system failures (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

/// Shorthand for the driver's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `INTERNAL` error with context: `"{context}: {err:#}"`.
    pub fn internal(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Error {
        Error::Internal(format!("{context}: {err:#}"))
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::Unimplemented(_) => tonic::Code::Unimplemented,
            Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// `INVALID_ARGUMENT` unless `value` is non-empty.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        Err(Error::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}
